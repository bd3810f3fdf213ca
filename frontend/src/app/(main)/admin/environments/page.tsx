"use client";

import { type FormEvent, useState } from "react";
import { AdminNav } from "@/components/AdminNav";
import {
  Confirm,
  DangerButton,
  DataTable,
  LoadState,
  Name,
  Pager,
  StatusBadge,
  Td,
  useChange,
  useConfirm,
  useLoad,
  useNow,
} from "@/components/ui";
import { api, type Environment, unwrap } from "@/lib/api";
import { formatDuration, formatMemory, parseTime, reason } from "@/lib/format";

const PAGE_SIZE = 50;
const ACTIVE = new Set(["pending", "starting", "running"]);

/** Every user's environments: who owns each, how it is, and Stop or Delete (both audited). */
export default function AdminEnvironmentsPage() {
  const [query, setQuery] = useState("");
  const [search, setSearch] = useState("");
  const [page, setPage] = useState(1);
  const now = useNow(10_000);
  const list = useLoad(
    () =>
      unwrap(
        api.GET("/api/v1/admin/environments", { params: { query: { query: search || null, page, page_size: PAGE_SIZE } } }),
      ),
    [search, page],
  );
  const action = useChange(list.reload);
  const target = (env: Environment) => ({ params: { path: { environment_id: env.id } } });
  const stopping = useConfirm<Environment>(action, (env, close) =>
    action.change(() => unwrap(api.POST("/api/v1/admin/environments/{environment_id}/stop", target(env))), close),
  );
  const deleting = useConfirm<Environment>(action, (env, close) =>
    action.change(() => unwrap(api.DELETE("/api/v1/admin/environments/{environment_id}", target(env))), close),
  );

  function submit(event: FormEvent) {
    event.preventDefault();
    setPage(1);
    setSearch(query.trim());
  }

  const owner = (env: Environment) => (env.owner.name ? `${env.owner.name} (${env.owner.email})` : env.owner.email);
  return (
    <>
      <h1>Every environment</h1>
      <AdminNav />
      <form className="inline-form" role="search" onSubmit={submit}>
        <label htmlFor="env-search">Search by name or owner</label>
        <input id="env-search" type="search" value={query} onChange={(e) => setQuery(e.target.value)} />
        <button type="submit">Search</button>
      </form>
      <LoadState load={list} actionError={action.error} what="Finding environments" empty={list.data?.items.length === 0}>
        No environment matches.
      </LoadState>
      {list.data && list.data.items.length > 0 ? (
        <DataTable caption="Every user's environments" columns={["Environment", "Owner", "Status", "Uptime", "Size", "Actions"]}>
          {list.data.items.map((env) => (
            <tr key={env.id} data-environment={env.name} data-owner={env.owner.email}>
              <th scope="row">
                <Name text={env.name} />
                <div className="muted small">{env.application.name}</div>
              </th>
              <Td label="Owner">
                <Name text={owner(env)} />
              </Td>
              <Td label="Status">
                <StatusBadge status={env.status} />
                {reason(env.status, env.status_message) ? (
                  <div className="muted small">{reason(env.status, env.status_message)}</div>
                ) : null}
              </Td>
              <Td label="Uptime">
                {env.status === "running" && env.started_at ? formatDuration(now - parseTime(env.started_at)) : "—"}
              </Td>
              <Td label="Size">
                {env.preset}: {env.cpu} CPU, {formatMemory(env.memory_mib)}
              </Td>
              <td className="row-actions">
                {ACTIVE.has(env.status) ? (
                  <button
                    type="button"
                    disabled={action.busy}
                    onClick={() => stopping.ask(env)}
                    aria-label={`Stop ${env.name} of ${env.owner.email}`}
                  >
                    Stop
                  </button>
                ) : null}
                <DangerButton
                  label={`Delete ${env.name} of ${env.owner.email}`}
                  disabled={action.busy}
                  onClick={() => deleting.ask(env)}
                />
              </td>
            </tr>
          ))}
        </DataTable>
      ) : null}
      <Pager page={page} total={list.data?.total ?? 0} pageSize={PAGE_SIZE} onPage={setPage} />
      <Confirm {...stopping.dialog} title="Stop environment" confirmLabel="Stop">
        <p>
          Stop {stopping.target?.name} of {stopping.target ? owner(stopping.target) : ""}? Its application stops at once (unsaved
          work in it is lost); its owner sees that an administrator stopped it, and can start it again. This is recorded in
          the audit trail.
        </p>
      </Confirm>
      <Confirm {...deleting.dialog} title="Delete environment" confirmLabel="Delete">
        <p>
          Delete {deleting.target?.name} of {deleting.target ? owner(deleting.target) : ""}? Its settings and its own home folder
          go; the owner&apos;s buckets and their files stay. This is recorded in the audit trail.
        </p>
      </Confirm>
    </>
  );
}
