"use client";

import { type FormEvent, useState } from "react";
import { AdminNav } from "@/components/AdminNav";
import { useUser } from "@/components/Shell";
import { DangerButton, DataTable, LoadState, Name, Pager, StatusBadge, Td, useChange, useLoad } from "@/components/ui";
import { type AdminUser, api, unwrap } from "@/lib/api";
import { formatMinutes, formatTime } from "@/lib/format";

const PAGE_SIZE = 50;

/** Minutes before this user's environments stop (0: never; empty: the server's default). */
function UptimeLimit({
  user,
  busy,
  fallback,
  onSet,
}: {
  user: AdminUser;
  busy: boolean;
  fallback: number | undefined;
  onSet: (minutes: number | null) => void;
}) {
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
      <input
        id={id}
        type="number"
        min={0}
        placeholder={fallback === undefined ? "default" : `default: ${fallback}`}
        title={fallback === undefined ? undefined : `Empty: the server's default, ${formatMinutes(fallback)}`}
        value={value}
        onChange={(e) => setValue(e.target.value)}
      />
      <button type="submit" disabled={busy} aria-label={`Set the maximum uptime of ${user.email}`}>
        Set
      </button>
    </form>
  );
}

const GIB = 1024 ** 3;

/** Storage this user's buckets may hold, in GiB (0: no quota; empty: the server's default). */
function StorageQuota({ user, busy, onSet }: { user: AdminUser; busy: boolean; onSet: (bytes: number | null) => void }) {
  const quota = user.storage_quota_bytes;
  const [value, setValue] = useState(quota === null ? "" : String(quota / GIB));
  const id = `quota-${user.id}`;
  return (
    <form
      className="inline-form compact"
      onSubmit={(event) => {
        event.preventDefault();
        onSet(value.trim() === "" ? null : Math.round(Number(value) * GIB));
      }}
    >
      <label htmlFor={id} className="visually-hidden">
        Storage quota of {user.email} in GiB
      </label>
      <input id={id} type="number" min={0} step="any" placeholder="default" value={value} onChange={(e) => setValue(e.target.value)} />
      <button type="submit" disabled={busy} aria-label={`Set the storage quota of ${user.email}`}>
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
  const action = useChange(list.reload);

  function submit(event: FormEvent) {
    event.preventDefault();
    setPage(1);
    setSearch(query.trim());
  }

  async function update(
    user: AdminUser,
    body: {
      role?: "admin" | "user";
      status?: "active" | "deactivated";
      max_uptime_minutes?: number | null;
      storage_quota_bytes?: number | null;
    },
  ) {
    await action.change(() =>
      unwrap(api.PATCH("/api/v1/admin/users/{user_id}", { params: { path: { user_id: user.id } }, body })),
    );
  }

  return (
    <>
      <h1>Users</h1>
      <AdminNav />
      <form className="inline-form" role="search" onSubmit={submit}>
        <label htmlFor="user-search">Search by e-mail or name</label>
        <input id="user-search" type="search" value={query} onChange={(e) => setQuery(e.target.value)} />
        <button type="submit">Search</button>
      </form>
      {list.data ? (
        <p className="muted" data-testid="uptime-default">
          Maximum uptime, in minutes: empty means the server&apos;s default,{" "}
          {list.data.default_max_uptime_minutes
            ? `${list.data.default_max_uptime_minutes} minutes (${formatMinutes(list.data.default_max_uptime_minutes)})`
            : "never"}
          ; 0 means never.
        </p>
      ) : null}
      <LoadState load={list} actionError={action.error} what="Finding users" empty={list.data?.items.length === 0}>
        No user matches.
      </LoadState>
      {list.data && list.data.items.length > 0 ? (
        <DataTable caption="Users" columns={["User", "Role", "Status", "Maximum uptime", "Storage quota (GiB)", "Last sign-in", "Actions"]}>
          {list.data.items.map((user) => (
            <tr key={user.id} data-user={user.email}>
              <th scope="row">
                <Name text={user.name || user.email} />
                <div className="muted small">
                  <Name text={`${user.email} · ${user.auth_provider}`} />
                </div>
              </th>
              <td data-label="Role">
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
              <Td label="Status">
                <StatusBadge status={user.status} />
              </Td>
              <Td label="Maximum uptime">
                <UptimeLimit
                  user={user}
                  busy={action.busy}
                  fallback={list.data?.default_max_uptime_minutes}
                  onSet={(minutes) => update(user, { max_uptime_minutes: minutes })}
                />
              </Td>
              <Td label="Storage quota">
                <StorageQuota user={user} busy={action.busy} onSet={(bytes) => update(user, { storage_quota_bytes: bytes })} />
              </Td>
              <Td label="Last sign-in">{formatTime(user.last_login_at)}</Td>
              <td className="row-actions">
                {user.id === me.id ? (
                  <span className="muted small">you</span>
                ) : user.status === "active" ? (
                  <DangerButton
                    label={`Deactivate ${user.email}`}
                    disabled={action.busy}
                    onClick={() => update(user, { status: "deactivated" })}
                  >
                    Deactivate
                  </DangerButton>
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
        </DataTable>
      ) : null}
      <Pager page={page} total={list.data?.total ?? 0} pageSize={PAGE_SIZE} onPage={setPage} />
    </>
  );
}
