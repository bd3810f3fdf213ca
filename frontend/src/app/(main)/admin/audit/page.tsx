"use client";

import { useState } from "react";
import { AdminNav } from "@/components/AdminNav";
import { DataTable, LoadState, Name, Pager, Td, useLoad } from "@/components/ui";
import { api, unwrap } from "@/lib/api";
import { formatTime } from "@/lib/format";

const PAGE_SIZE = 50;

const TARGETS: Record<string, string> = {
  user: "user",
  environment: "environment",
  storage: "bucket",
  application: "application",
  secret_file: "secret file",
  api_token: "API token",
};

const ID = /^[0-9a-f]{32}$/;
const isId = (value: unknown) => (typeof value === "string" && ID.test(value)) || (Array.isArray(value) && value.length > 0 && value.every((v) => typeof v === "string" && ID.test(v)));
const SHOWN_ELSEWHERE = new Set(["name", "email", "display_name"]);

/** An event's detail for people: "reason: stopped by its owner · preset: light", without ids. */
function describeDetail(detail: Record<string, unknown>): string {
  return Object.entries(detail)
    .filter(([key, value]) => !/(^|_)ids?$/.test(key) && !SHOWN_ELSEWHERE.has(key) && value !== null && !isId(value))
    .map(([key, value]) => {
      const shown =
        typeof value === "object"
          ? Array.isArray(value)
            ? value.join(", ")
            : Object.entries(value as Record<string, unknown>)
                .map(([k, v]) => `${k.replace(/_/g, " ")} ${String(v)}`)
                .join(", ")
          : String(value);
      return `${key.replace(/_/g, " ")}: ${shown}`;
    })
    .join(" · ");
}

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
              <Td label="When">{formatTime(event.at)}</Td>
              <Td label="Who">
                <Name
                  text={
                    event.actor_email
                      ? event.actor_name
                        ? `${event.actor_name} (${event.actor_email})`
                        : event.actor_email
                      : event.actor_id
                        ? "a removed user"
                        : "the server"
                  }
                />
              </Td>
              <th scope="row">{event.action}</th>
              <Td label="Target">
                <Name text={`${TARGETS[event.target_type] ?? event.target_type.replace(/_/g, " ")} ${event.target_name ?? "(since removed)"}`} />
              </Td>
              <Td label="Detail">
                <span className="small detail">{describeDetail(event.detail)}</span>
              </Td>
            </tr>
          ))}
        </DataTable>
      ) : null}
      <Pager page={page} total={list.data?.total ?? 0} pageSize={PAGE_SIZE} onPage={setPage} previous="Newer" next="Older" />
    </>
  );
}
