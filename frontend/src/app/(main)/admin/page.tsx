"use client";

import Link from "next/link";
import { AdminNav } from "@/components/AdminNav";
import { DataTable, ErrorMessage, Loading, Name, Td, useLoad } from "@/components/ui";
import { api, unwrap } from "@/lib/api";
import { formatBytes, formatTime, plural } from "@/lib/format";

export default function MonitoringPage() {
  const stats = useLoad(() => unwrap(api.GET("/api/v1/admin/stats")));
  const migration = useLoad(() => unwrap(api.GET("/api/v1/admin/migration")));
  const s = stats.data;
  const m = migration.data;
  return (
    <>
      <h1>Administration</h1>
      <AdminNav />
      <ErrorMessage error={stats.error} />
      {stats.loading ? <Loading what="Counting" /> : null}
      {s ? (
        <>
          <div className="cards">
            <section className="card" aria-labelledby="st-users">
              <h2 id="st-users">Users</h2>
              <p className="big">{s.users.active}</p>
              <p>
                active of {s.users.total}; {plural(s.users.admins, "administrator")}, {s.users.deactivated} deactivated,{" "}
                {s.users.signed_in_last_24h} signed in during the last day.
              </p>
            </section>
            <section className="card" aria-labelledby="st-envs">
              <h2 id="st-envs">
                <Link href="/admin/environments/">Environments</Link>
              </h2>
              <p className="big">{s.environments.total}</p>
              <ul className="plain">
                {Object.entries(s.environments.by_status).map(([status, count]) => (
                  <li key={status}>
                    {status}: {count}
                  </li>
                ))}
              </ul>
            </section>
            <section className="card" aria-labelledby="st-storage">
              <h2 id="st-storage">Storage</h2>
              <p className="big">{formatBytes(s.storages.usage_bytes)}</p>
              <p>
                in {plural(s.storages.count, "bucket")}
                {s.storages.usage_unknown ? ` (${s.storages.usage_unknown} not measured yet)` : ""}.
              </p>
            </section>
            <section className="card" aria-labelledby="st-apps">
              <h2 id="st-apps">Applications</h2>
              <p className="big">{s.applications.active}</p>
              <p>active of {s.applications.total} in the catalog.</p>
            </section>
          </div>
          <p className="muted small">
            Counted {formatTime(s.at)}. Prometheus metrics for dashboards and alerts: <a href="/metrics">/metrics</a>.
          </p>
          <button
            type="button"
            onClick={() => {
              void stats.reload();
              void migration.reload();
            }}
          >
            Refresh
          </button>
        </>
      ) : null}
      <ErrorMessage error={migration.error} />
      {m && m.buckets.length > 0 ? (
        <section aria-labelledby="migration">
          <h2 id="migration">Moving to another cloud</h2>
          <p>
            {formatBytes(m.bytes_verified)} of {formatBytes(m.bytes_total)} verified; {plural(m.copying, "bucket")} being
            copied, {m.switched} switched, {m.finished} finished (sources deleted). <code>cmbcluster migrate run</code>{" "}
            copies; this page shows what it has verified.
          </p>
          <DataTable caption="Buckets being moved" columns={["Owner", "From", "To", "State", "Verified", "Note"]}>
            {m.buckets.map((b) => (
              <tr key={`${b.storage_id} ${b.target}`}>
                <th scope="row">
                  <Name text={b.owner ?? "(account deleted)"} />
                </th>
                <Td label="From">
                  <Name text={b.source} />
                </Td>
                <Td label="To">
                  <Name text={b.target} />
                </Td>
                <Td label="State">{b.state}</Td>
                <Td label="Verified">
                  {formatBytes(b.bytes_verified)} of {formatBytes(b.bytes_total)} ·{" "}
                  {b.objects_verified}/{b.objects_total} files
                </Td>
                <Td label="Note">{b.message}</Td>
              </tr>
            ))}
          </DataTable>
        </section>
      ) : null}
    </>
  );
}
