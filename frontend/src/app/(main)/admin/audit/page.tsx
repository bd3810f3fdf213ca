"use client";

import { useState } from "react";
import { AdminNav } from "@/components/AdminNav";
import { Empty, ErrorMessage, Loading, useLoad } from "@/components/ui";
import { api, unwrap } from "@/lib/api";
import { formatTime } from "@/lib/format";

const PAGE_SIZE = 50;

export default function AuditPage() {
  const [page, setPage] = useState(1);
  const list = useLoad(() => unwrap(api.GET("/api/v1/admin/audit", { params: { query: { page, page_size: PAGE_SIZE } } })), [page]);
  const total = list.data?.total ?? 0;
  return (
    <>
      <h1>Audit trail</h1>
      <AdminNav />
      <ErrorMessage error={list.error} />
      {list.loading ? <Loading what="Reading the audit trail" /> : null}
      {list.data?.items.length === 0 ? <Empty>Nothing recorded yet.</Empty> : null}
      {list.data && list.data.items.length > 0 ? (
        <div className="table-wrap">
          <table>
            <caption className="visually-hidden">Audit events, newest first</caption>
            <thead>
              <tr>
                <th scope="col">When</th>
                <th scope="col">Who</th>
                <th scope="col">Action</th>
                <th scope="col">Target</th>
                <th scope="col">Detail</th>
              </tr>
            </thead>
            <tbody>
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
            </tbody>
          </table>
        </div>
      ) : null}
      {total > PAGE_SIZE ? (
        <div className="toolbar">
          <button type="button" disabled={page <= 1} onClick={() => setPage(page - 1)}>
            Newer
          </button>
          <span>
            Page {page} of {Math.ceil(total / PAGE_SIZE)}
          </span>
          <button type="button" disabled={page * PAGE_SIZE >= total} onClick={() => setPage(page + 1)}>
            Older
          </button>
        </div>
      ) : null}
    </>
  );
}
