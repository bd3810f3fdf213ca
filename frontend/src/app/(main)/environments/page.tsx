"use client";

import Link from "next/link";
import { useEffect, useState } from "react";
import {
  Confirm,
  DangerButton,
  DataTable,
  Dialog,
  Empty,
  ErrorMessage,
  Loading,
  LoadState,
  StatusBadge,
  useChange,
  useConfirm,
  useLoad,
  useNow,
} from "@/components/ui";
import { api, type Environment, unwrap } from "@/lib/api";
import { formatDuration, parseTime } from "@/lib/format";

const ACTIVE = new Set(["pending", "starting", "running"]);
const TRANSITIONAL = new Set(["pending", "starting"]);

type Verb = "start" | "stop" | "restart";

function perform(env: Environment, verb: Verb | "delete"): Promise<unknown> {
  const params = { params: { path: { environment_id: env.id } } };
  if (verb === "delete") return unwrap(api.DELETE("/api/v1/environments/{environment_id}", params));
  if (verb === "start") return unwrap(api.POST("/api/v1/environments/{environment_id}/start", params));
  if (verb === "stop") return unwrap(api.POST("/api/v1/environments/{environment_id}/stop", params));
  return unwrap(api.POST("/api/v1/environments/{environment_id}/restart", params));
}

function Logs({ environment }: { environment: Environment }) {
  const logs = useLoad(() =>
    unwrap(
      api.GET("/api/v1/environments/{environment_id}/logs", {
        params: { path: { environment_id: environment.id }, query: { tail: 200 } },
      }),
    ),
  );
  return (
    <>
      <ErrorMessage error={logs.error} />
      {logs.loading ? <Loading what="Reading the output" /> : null}
      {logs.data ? (
        logs.data.lines ? (
          <pre className="logs" tabIndex={0} aria-label={`Output of ${environment.name}`}>
            {logs.data.lines}
          </pre>
        ) : (
          <Empty>No output yet.</Empty>
        )
      ) : null}
      <div className="actions">
        <button type="button" onClick={() => void logs.reload()}>
          Refresh
        </button>
      </div>
    </>
  );
}

export default function EnvironmentsPage() {
  const list = useLoad(() => unwrap(api.GET("/api/v1/environments")).then((a) => a.items));
  const { reload } = list;
  const action = useChange(reload);
  const now = useNow(1000);
  const [selected, setSelected] = useState<Set<string>>(new Set());
  const deleting = useConfirm<Environment[]>(action, (targets, close) => act(targets, "delete", close));
  const [showingLogs, setShowingLogs] = useState<Environment | null>(null);
  const environments = list.data ?? [];

  // Poll while any environment is changing state, slower otherwise (shutdown times move too).
  const changing = environments.some((env) => TRANSITIONAL.has(env.status));
  useEffect(() => {
    const timer = setInterval(() => void reload(), changing ? 1500 : 15000);
    return () => clearInterval(timer);
  }, [changing, reload]);

  /** Runs `verb` on every target; on success clears the selection and calls `onDone`. */
  async function act(targets: Environment[], verb: Verb | "delete", onDone?: () => void) {
    await action.change(
      async () => {
        for (const env of targets) await perform(env, verb);
      },
      () => {
        setSelected(new Set());
        onDone?.();
      },
    );
  }

  const chosen = environments.filter((env) => selected.has(env.id));
  const allSelected = environments.length > 0 && chosen.length === environments.length;
  const warnings = environments.filter((env) => env.shutdown_warning && env.shutdown_at && ACTIVE.has(env.status));

  return (
    <>
      <h1>Environments</h1>
      {warnings.map((env) => (
        <p key={env.id} className="warning" role="alert">
          {env.name} stops automatically in {formatDuration(parseTime(env.shutdown_at as string) - now)}: save your work
          (your files in mounted buckets stay).
        </p>
      ))}
      <LoadState load={list} actionError={action.error} what="Loading your environments" empty={list.data && environments.length === 0}>
        You have no environment. <Link href="/applications/">Launch an application</Link>.
      </LoadState>
      {environments.length > 0 ? (
        <>
          <div className="toolbar" role="group" aria-label="Actions on the selected environments">
            <span className="muted">{chosen.length} selected</span>
            <button type="button" disabled={!chosen.length || action.busy} onClick={() => act(chosen, "start")}>
              Start selected
            </button>
            <button type="button" disabled={!chosen.length || action.busy} onClick={() => act(chosen, "stop")}>
              Stop selected
            </button>
            <button type="button" className="danger" disabled={!chosen.length || action.busy} onClick={() => deleting.ask(chosen)}>
              Delete selected
            </button>
          </div>
          <DataTable
            caption="Your environments"
            columns={[
              <input
                type="checkbox"
                aria-label="Select all environments"
                checked={allSelected}
                onChange={(e) => setSelected(new Set(e.target.checked ? environments.map((env) => env.id) : []))}
              />,
              "Name",
              "Status",
              "Uptime",
              "Stops in",
              "Actions",
            ]}
          >
            {environments.map((env) => (
              <tr key={env.id} data-environment={env.name}>
                <td>
                  <input
                    type="checkbox"
                    aria-label={`Select ${env.name}`}
                    checked={selected.has(env.id)}
                    onChange={(e) => {
                      const next = new Set(selected);
                      if (e.target.checked) next.add(env.id);
                      else next.delete(env.id);
                      setSelected(next);
                    }}
                  />
                </td>
                <th scope="row">
                  {env.name}
                  <div className="muted small">
                    {env.application.name} · {env.preset} · {env.cpu} CPU
                  </div>
                </th>
                <td>
                  <StatusBadge status={env.status} />
                  {env.status_message ? <div className="muted small">{env.status_message}</div> : null}
                </td>
                <td>{env.status === "running" && env.started_at ? formatDuration(now - parseTime(env.started_at)) : "—"}</td>
                <td className={env.shutdown_warning ? "warn-text" : undefined}>
                  {env.shutdown_at && ACTIVE.has(env.status) ? formatDuration(parseTime(env.shutdown_at) - now) : "—"}
                </td>
                <td className="row-actions">
                  {env.status === "running" && env.url ? (
                    <a className="button primary" href={env.url} target="_blank" rel="noopener noreferrer" aria-label={`Open ${env.name}`}>
                      Open
                    </a>
                  ) : null}
                  {ACTIVE.has(env.status) ? (
                    <button type="button" disabled={action.busy} onClick={() => act([env], "stop")} aria-label={`Stop ${env.name}`}>
                      Stop
                    </button>
                  ) : (
                    <button type="button" disabled={action.busy} onClick={() => act([env], "start")} aria-label={`Start ${env.name}`}>
                      Start
                    </button>
                  )}
                  <button type="button" disabled={action.busy} onClick={() => act([env], "restart")} aria-label={`Restart ${env.name}`}>
                    Restart
                  </button>
                  <button type="button" onClick={() => setShowingLogs(env)} aria-label={`Logs of ${env.name}`}>
                    Logs
                  </button>
                  <DangerButton label={`Delete ${env.name}`} disabled={action.busy} onClick={() => deleting.ask([env])} />
                </td>
              </tr>
            ))}
          </DataTable>
        </>
      ) : null}
      <Dialog open={showingLogs !== null} title="Output" onClose={() => setShowingLogs(null)}>
        {showingLogs ? <Logs environment={showingLogs} /> : null}
      </Dialog>
      <Confirm {...deleting.dialog} title="Delete environments" confirmLabel="Delete">
        <p>
          Delete {deleting.target?.map((env) => env.name).join(", ")}? Your buckets and their files stay; the environment&apos;s
          settings are lost.
        </p>
      </Confirm>
    </>
  );
}
