"use client";

import Link from "next/link";
import { useEffect } from "react";
import { useUser } from "@/components/Shell";
import { Empty, ErrorMessage, Loading, StatusBadge, useLoad, useNow } from "@/components/ui";
import { api, type Environment, unwrap } from "@/lib/api";
import { formatBytes, parseTime, since } from "@/lib/format";

declare global {
  interface Window {
    /** performance.now() when the dashboard became usable (read by the browser tests). */
    __cmbclusterReady?: number;
  }
}

interface ActivityItem {
  at: string;
  text: string;
}

/** Recent activity, told by the environments' own timestamps. */
function activity(environments: Environment[]): ActivityItem[] {
  const items: ActivityItem[] = [];
  for (const env of environments) {
    items.push({ at: env.created_at, text: `Created ${env.name} (${env.application.name})` });
    if (env.started_at) items.push({ at: env.started_at, text: `Started ${env.name}` });
    if (env.stopped_at) items.push({ at: env.stopped_at, text: `Stopped ${env.name}` });
  }
  return items.sort((a, b) => parseTime(b.at) - parseTime(a.at)).slice(0, 8);
}

export default function DashboardPage() {
  const user = useUser();
  const now = useNow(30_000);
  const environments = useLoad(() => unwrap(api.GET("/api/v1/environments")).then((a) => a.items));
  const storages = useLoad(() => unwrap(api.GET("/api/v1/storages")).then((a) => a.storages));
  const ready = !environments.loading && !storages.loading;

  useEffect(() => {
    if (ready && window.__cmbclusterReady === undefined) window.__cmbclusterReady = performance.now();
  }, [ready]);

  const running = environments.data?.filter((env) => env.status === "running") ?? [];
  const used = storages.data?.reduce((sum, s) => sum + (s.size_bytes ?? 0), 0) ?? 0;
  return (
    <div data-ready={ready ? "true" : undefined}>
      <h1>Welcome, {user.name || user.email}</h1>
      <div className="cards">
        <section className="card" aria-labelledby="my-envs">
          <h2 id="my-envs">My environments</h2>
          <ErrorMessage error={environments.error} />
          {environments.loading ? <Loading /> : null}
          {environments.data && environments.data.length === 0 ? (
            <Empty>
              No environment yet. <Link href="/applications/">Launch an application</Link>.
            </Empty>
          ) : null}
          {environments.data && environments.data.length > 0 ? (
            <>
              <p>
                {running.length} running of {environments.data.length}.
              </p>
              <ul className="plain">
                {environments.data.slice(0, 5).map((env) => (
                  <li key={env.id}>
                    <StatusBadge status={env.status} /> {env.name}{" "}
                    {env.status === "running" && env.url ? (
                      <a href={env.url} target="_blank" rel="noopener noreferrer">
                        Open
                      </a>
                    ) : null}
                  </li>
                ))}
              </ul>
              <Link href="/environments/">All environments</Link>
            </>
          ) : null}
        </section>
        <section className="card" aria-labelledby="my-storage">
          <h2 id="my-storage">Storage usage</h2>
          <ErrorMessage error={storages.error} />
          {storages.loading ? <Loading /> : null}
          {storages.data && storages.data.length === 0 ? (
            <Empty>
              No bucket yet. <Link href="/storage/">Create one</Link>.
            </Empty>
          ) : null}
          {storages.data && storages.data.length > 0 ? (
            <>
              <p className="big">{formatBytes(used)}</p>
              <p>
                in {storages.data.length} bucket{storages.data.length === 1 ? "" : "s"}.
              </p>
              <Link href="/storage/">Manage storage</Link>
            </>
          ) : null}
        </section>
        <section className="card" aria-labelledby="recent">
          <h2 id="recent">Recent activity</h2>
          {environments.data && environments.data.length === 0 ? <Empty>Nothing yet.</Empty> : null}
          <ul className="plain">
            {activity(environments.data ?? []).map((item, index) => (
              <li key={index}>
                {item.text} <span className="muted">{since(item.at, now)}</span>
              </li>
            ))}
          </ul>
        </section>
      </div>
    </div>
  );
}
