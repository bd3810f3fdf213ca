"use client";

import { useState } from "react";
import { AdminNav } from "@/components/AdminNav";
import { DataTable, LoadState, Pager, useLoad } from "@/components/ui";
import { api, unwrap } from "@/lib/api";
import { formatTime } from "@/lib/format";

const PAGE_SIZE = 50;

export default function AuditPage() {
  const [page, setPage] = useState(1);
  const list = useLoad(() => unwrap(api.GET("/api/v1/admin/audit", { params: { query: { page, page_size: PAGE_SIZE } } })), [page]);
  return (
    <>
      <h1>Audit trail</h1>
      <AdminNav />
      <LoadState load={list} what="Reading the audit trail" empty={list.data?.items.length === 0}>
        Nothing recorded yet.
      </LoadState>
      {list.data && list.data.items.length > 0 ? (
        <DataTable caption="Audit events, newest first" columns={["When", "Who", "Action", "Target", "Detail"]}>
          {list.data.items.map((event) => (
            <tr key={event.id}>
              <td>{formatTime(event.at)}</td>
              <td>{event.actor_email ?? (event.actor_id ? "a removed user" : "system")}</td>
              <th scope="row">{event.action}</th>
              <td>
                {event.target_type} <code className="small">{event.target_id}</code>
              </td>
              <td>
                <code className="small detail">{JSON.stringify(event.detail)}</code>
              </td>
            </tr>
          ))}
        </DataTable>
      ) : null}
      <Pager page={page} total={list.data?.total ?? 0} pageSize={PAGE_SIZE} onPage={setPage} previous="Newer" next="Older" />
    </>
  );
}
