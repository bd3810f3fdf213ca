"use client";

import { type FormEvent, useState } from "react";
import { AdminNav } from "@/components/AdminNav";
import { useUser } from "@/components/Shell";
import { Empty, ErrorMessage, Loading, useAction, useLoad } from "@/components/ui";
import { type AdminUser, api, unwrap } from "@/lib/api";
import { formatTime } from "@/lib/format";

const PAGE_SIZE = 50;

/** Minutes before this user's environments stop (0: never; empty: the server's default). */
function UptimeLimit({ user, busy, onSet }: { user: AdminUser; busy: boolean; onSet: (minutes: number | null) => void }) {
  const [value, setValue] = useState(user.max_uptime_minutes === null ? "" : String(user.max_uptime_minutes));
  const id = `uptime-${user.id}`;
  return (
    <form
      className="inline-form compact"
      onSubmit={(event) => {
        event.preventDefault();
        onSet(value.trim() === "" ? null : Number(value));
      }}
    >
      <label htmlFor={id} className="visually-hidden">
        Maximum uptime of {user.email} in minutes
      </label>
      <input id={id} type="number" min={0} placeholder="default" value={value} onChange={(e) => setValue(e.target.value)} />
      <button type="submit" disabled={busy} aria-label={`Set the maximum uptime of ${user.email}`}>
        Set
      </button>
    </form>
  );
}

export default function UsersPage() {
  const me = useUser();
  const [query, setQuery] = useState("");
  const [search, setSearch] = useState("");
  const [page, setPage] = useState(1);
  const list = useLoad(
    () =>
      unwrap(api.GET("/api/v1/admin/users", { params: { query: { query: search || null, page, page_size: PAGE_SIZE } } })),
    [search, page],
  );
  const action = useAction();

  function submit(event: FormEvent) {
    event.preventDefault();
    setPage(1);
    setSearch(query.trim());
  }

  async function update(
    user: AdminUser,
    body: { role?: "admin" | "user"; status?: "active" | "deactivated"; max_uptime_minutes?: number | null },
  ) {
    await action.run(() =>
      unwrap(api.PATCH("/api/v1/admin/users/{user_id}", { params: { path: { user_id: user.id } }, body })),
    );
    await list.reload();
  }

  const total = list.data?.total ?? 0;
  return (
    <>
      <h1>Users</h1>
      <AdminNav />
      <form className="inline-form" role="search" onSubmit={submit}>
        <label htmlFor="user-search">Search by e-mail or name</label>
        <input id="user-search" type="search" value={query} onChange={(e) => setQuery(e.target.value)} />
        <button type="submit">Search</button>
      </form>
      <ErrorMessage error={list.error} />
      <ErrorMessage error={action.error} />
      {list.loading ? <Loading what="Finding users" /> : null}
      {list.data?.items.length === 0 ? <Empty>No user matches.</Empty> : null}
      {list.data && list.data.items.length > 0 ? (
        <div className="table-wrap">
          <table>
            <caption className="visually-hidden">Users</caption>
            <thead>
              <tr>
                <th scope="col">User</th>
                <th scope="col">Role</th>
                <th scope="col">Status</th>
                <th scope="col">Maximum uptime</th>
                <th scope="col">Last sign-in</th>
                <th scope="col">Actions</th>
              </tr>
            </thead>
            <tbody>
              {list.data.items.map((user) => (
                <tr key={user.id} data-user={user.email}>
                  <th scope="row">
                    {user.name || user.email}
                    <div className="muted small">
                      {user.email} · {user.auth_provider}
                    </div>
                  </th>
                  <td>
                    <label htmlFor={`role-${user.id}`} className="visually-hidden">
                      Role of {user.email}
                    </label>
                    <select
                      id={`role-${user.id}`}
                      value={user.role}
                      disabled={action.busy || user.id === me.id}
                      onChange={(e) => update(user, { role: e.target.value as "admin" | "user" })}
                    >
                      <option value="user">user</option>
                      <option value="admin">admin</option>
                    </select>
                  </td>
                  <td>
                    <span className={`badge badge-${user.status}`}>{user.status}</span>
                  </td>
                  <td>
                    <UptimeLimit user={user} busy={action.busy} onSet={(minutes) => update(user, { max_uptime_minutes: minutes })} />
                  </td>
                  <td>{formatTime(user.last_login_at)}</td>
                  <td className="row-actions">
                    {user.id === me.id ? (
                      <span className="muted small">you</span>
                    ) : user.status === "active" ? (
                      <button
                        type="button"
                        className="danger"
                        disabled={action.busy}
                        aria-label={`Deactivate ${user.email}`}
                        onClick={() => update(user, { status: "deactivated" })}
                      >
                        Deactivate
                      </button>
                    ) : (
                      <button
                        type="button"
                        disabled={action.busy}
                        aria-label={`Activate ${user.email}`}
                        onClick={() => update(user, { status: "active" })}
                      >
                        Activate
                      </button>
                    )}
                  </td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      ) : null}
      {total > PAGE_SIZE ? (
        <div className="toolbar">
          <button type="button" disabled={page <= 1} onClick={() => setPage(page - 1)}>
            Previous
          </button>
          <span>
            Page {page} of {Math.ceil(total / PAGE_SIZE)}
          </span>
          <button type="button" disabled={page * PAGE_SIZE >= total} onClick={() => setPage(page + 1)}>
            Next
          </button>
        </div>
      ) : null}
    </>
  );
}
