"use client";

import Link from "next/link";
import { useEffect } from "react";
import { useUser } from "@/components/Shell";
import { Card, LoadState, Name, StatusBadge, useLoad, useNow } from "@/components/ui";
import { api, type Schemas, unwrap } from "@/lib/api";
import { QUOTA_CLASS, formatBytes, plural, quotaState, since, stoppedBecause } from "@/lib/format";
import { budgetClass, budgetConsequence, estimateNote, hours, money } from "@/lib/usage";

declare global {
  interface Window {
    /** performance.now() when the dashboard became usable (read by the browser tests). */
    __cmbclusterReady?: number;
  }
}

type Activity = Schemas["ActivityOut"];
// Heartbeats and traffic only keep an environment alive: not news for the person.
const QUIET = new Set(["heartbeat", "traffic"]);

function detail(item: Activity, key: string): string {
  const value = item.detail[key];
  return typeof value === "string" ? value : "";
}

/** One line of recent activity, naming environments by their names. */
function describe(item: Activity, names: Map<string, string>): string {
  const env = item.environment_id ? (names.get(item.environment_id) ?? "An environment (since deleted)") : "";
  switch (item.kind) {
    case "sign_in": {
      const provider = detail(item, "provider_name") || detail(item, "provider");
      return `Signed in${provider ? ` with ${provider}` : ""}`;
    }
    case "environment_running":
      return `${env} started`;
    case "environment_stopped":
      return `${env} ${stoppedBecause(detail(item, "reason"))}`;
    case "environment_failed":
      return `${env} failed to start${detail(item, "message") ? `: ${detail(item, "message")}` : ""}`;
    case "environment_extended":
      return `${env}: its automatic stop was postponed`;
    case "environment_vanished":
      return `${env} disappeared and was marked stopped`;
    case "shutdown_warning":
      return `${env} was about to stop automatically`;
    default:
      return `${item.kind.replace(/_/g, " ")}${env ? `: ${env}` : ""}`;
  }
}

export default function DashboardPage() {
  const user = useUser();
  const now = useNow(30_000);
  const environments = useLoad(() => unwrap(api.GET("/api/v1/environments")).then((a) => a.items));
  const storageList = useLoad(() => unwrap(api.GET("/api/v1/storages")));
  const storages = { ...storageList, data: storageList.data?.storages };
  const activity = useLoad(() =>
    unwrap(api.GET("/api/v1/auth/me/activity", { params: { query: { page_size: 30 } } })).then((a) =>
      a.items.filter((item) => !QUIET.has(item.kind)).slice(0, 8),
    ),
  );
  const usage = useLoad(() => unwrap(api.GET("/api/v1/usage/me")));
  const ready = !environments.loading && !storages.loading && !activity.loading && !usage.loading;
  const names = new Map((environments.data ?? []).map((env) => [env.id, env.name]));

  useEffect(() => {
    if (ready && window.__cmbclusterReady === undefined) window.__cmbclusterReady = performance.now();
  }, [ready]);

  const running = environments.data?.filter((env) => env.status === "running") ?? [];
  const quota = storageList.data?.quota;
  const used = storages.data?.reduce((sum, s) => sum + (s.size_bytes ?? 0), 0) ?? 0;
  return (
    <div data-ready={ready ? "true" : undefined}>
      <h1>
        <Name text={`Welcome, ${user.name || user.email}`} focusable={false} />
      </h1>
      <div className="cards">
        <Card id="my-envs" title="My environments">
          <LoadState load={environments} empty={environments.data?.length === 0}>
            No environment yet. <Link href="/applications/">Launch an application</Link>.
          </LoadState>
          {environments.data && environments.data.length > 0 ? (
            <>
              <p>
                {/* "of your N": the other pages' "N running of M allowed" counts against the limit */}
                {running.length} running, of your {environments.data.length} environment
                {environments.data.length === 1 ? "" : "s"}.
              </p>
              <ul className="plain">
                {environments.data.slice(0, 5).map((env) => (
                  <li key={env.id} className="inline-name">
                    <StatusBadge status={env.status} /> <Name text={env.name} />
                    {env.status === "running" && env.url ? (
                      <a href={env.url} target="_blank" rel="noopener noreferrer" aria-label={`Open ${env.name}`}>
                        Open
                      </a>
                    ) : null}
                  </li>
                ))}
              </ul>
              <Link href="/environments/">All environments</Link>
            </>
          ) : null}
        </Card>
        <Card id="my-storage" title="Storage usage">
          <LoadState load={storages} empty={storages.data?.length === 0}>
            No bucket yet. <Link href="/storage/">Create one</Link>.
          </LoadState>
          {storages.data && storages.data.length > 0 ? (
            <>
              <p className="big">{formatBytes(quota?.used_bytes ?? used)}</p>
              <p className={QUOTA_CLASS[quotaState(quota?.used_bytes ?? used, quota?.quota_bytes)]}>
                in {plural(storages.data.length, "bucket")}
                {quota && quota.noncurrent_bytes > 0 ? `, ${formatBytes(quota.noncurrent_bytes)} of it in earlier versions` : ""}
                {quota?.quota_bytes != null ? `, of your ${formatBytes(quota.quota_bytes)} quota` : ""}
                {quotaState(quota?.used_bytes ?? used, quota?.quota_bytes) === "over" ? ": it is used up, so uploads are refused" : ""}.
              </p>
              {storageList.data?.group_quotas.map((group) => {
                const full = quotaState(group.used_bytes, group.quota_bytes);
                return (
                  <p key={group.group} className={`group-quota ${QUOTA_CLASS[full]}`}>
                    Group {group.group}: {formatBytes(group.used_bytes)} of {formatBytes(group.quota_bytes)} used
                    {full === "over" ? ": over its quota, so uploads are refused" : ""}.
                  </p>
                );
              })}
              <Link href="/storage/">Manage storage</Link>
            </>
          ) : null}
        </Card>
        <Card id="my-usage" title="This month">
          <LoadState load={usage} what="Adding up your usage" empty={false}>
            {null}
          </LoadState>
          {usage.data?.totals ? (
            <>
              {/* No prices: an amount would read "$0.00" beside "no amounts": the hours lead instead */}
              <p className="big">
                {usage.data.priced
                  ? money(usage.data.totals.cost, usage.data.currency)
                  : `${hours(usage.data.totals.environment_hours)} h`}
              </p>
              <p>
                {usage.data.priced ? `estimated for ${hours(usage.data.totals.environment_hours)} ` : ""}environment hours (
                {hours(usage.data.totals.core_hours)} core-hours) and {usage.data.totals.storage_gb_months.toFixed(3)} GB-months
                of storage.
              </p>
              {(usage.data.budgets ?? [])
                .filter((budget) => budget.state !== "ok")
                .map((budget) => (
                  <p key={budget.id} className={budgetClass(budget)} role="status">
                    {budget.message}. {budgetConsequence(budget)}
                  </p>
                ))}
              <p className="small muted estimate">{estimateNote(usage.data)}</p>
            </>
          ) : null}
        </Card>
        <Card id="recent" title="Recent activity">
          <LoadState load={activity} empty={activity.data?.length === 0}>
            Nothing yet.
          </LoadState>
          <ul className="plain" aria-label="Recent activity">
            {activity.data?.map((item) => (
              <li key={item.id}>
                {describe(item, names)} <span className="muted small">{since(item.at, now)}</span>
              </li>
            ))}
          </ul>
        </Card>
      </div>
    </div>
  );
}
