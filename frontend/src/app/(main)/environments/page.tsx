"use client";

import Link from "next/link";
import { type FormEvent, useEffect, useRef, useState } from "react";
import {
  Confirm,
  DangerButton,
  DataTable,
  Dialog,
  Empty,
  ErrorMessage,
  Field,
  Loading,
  LoadState,
  Name,
  StatusBadge,
  Td,
  useAction,
  useChange,
  useConfirm,
  useLoad,
  useNow,
} from "@/components/ui";
import { api, type Environment, type Limits, unwrap } from "@/lib/api";
import { formatBytes, formatDuration, formatMemory, formatMinutes, parseTime, reason } from "@/lib/format";

const ACTIVE = new Set(["pending", "starting", "running"]);
const TRANSITIONAL = new Set(["pending", "starting", "stopping"]);

type Verb = "start" | "stop" | "restart";

function perform(env: Environment, verb: Verb | "delete" | "extend"): Promise<unknown> {
  const params = { params: { path: { environment_id: env.id } } };
  if (verb === "delete") return unwrap(api.DELETE("/api/v1/environments/{environment_id}", params));
  if (verb === "start") return unwrap(api.POST("/api/v1/environments/{environment_id}/start", params));
  if (verb === "stop") return unwrap(api.POST("/api/v1/environments/{environment_id}/stop", params));
  if (verb === "extend") return unwrap(api.POST("/api/v1/environments/{environment_id}/extend", params));
  return unwrap(api.POST("/api/v1/environments/{environment_id}/restart", params));
}

/**
 * The environment's output, scrolled to its end (where a failure says why). While it runs, "Follow"
 * reads it again every two seconds and keeps the end in view, unless the person scrolls up.
 */
function Logs({ environment }: { environment: Environment }) {
  const running = ACTIVE.has(environment.status);
  const [follow, setFollow] = useState(running);
  const logs = useLoad(() =>
    unwrap(
      api.GET("/api/v1/environments/{environment_id}/logs", {
        params: { path: { environment_id: environment.id }, query: { tail: 500 } },
      }),
    ),
  );
  const { reload } = logs;
  const box = useRef<HTMLPreElement>(null);
  const text = logs.data?.lines ?? "";

  useEffect(() => {
    if (!follow) return;
    const timer = setInterval(() => void reload(), 2000);
    return () => clearInterval(timer);
  }, [follow, reload]);
  useEffect(() => {
    const pre = box.current;
    if (pre && (follow || pre.dataset.scrolled !== "yes")) {
      pre.scrollTop = pre.scrollHeight;
      pre.dataset.scrolled = "yes";
    }
  }, [text, follow]);

  return (
    <>
      <ErrorMessage error={logs.error} />
      {logs.loading ? <Loading what="Reading the output" /> : null}
      {logs.data ? (
        text ? (
          <pre
            ref={box}
            className="logs"
            tabIndex={0}
            aria-label={`Output of ${environment.name}`}
            data-testid="logs"
            onScroll={(event) => {
              const pre = event.currentTarget;
              const atEnd = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 24;
              if (!atEnd && follow) setFollow(false);
            }}
          >
            {text}
          </pre>
        ) : (
          <Empty>No output yet.</Empty>
        )
      ) : null}
      <div className="actions">
        {running ? (
          <label className="choice">
            <input type="checkbox" checked={follow} onChange={(e) => setFollow(e.target.checked)} /> Follow (new lines
            as they come)
          </label>
        ) : null}
        <button type="button" onClick={() => void logs.reload()}>
          Refresh
        </button>
      </div>
    </>
  );
}

/** Size, buckets and variables of a stopped environment, used at its next start. */
function EditForm({ environment, onSaved }: { environment: Environment; onSaved: () => void }) {
  const presets = useLoad(() => unwrap(api.GET("/api/v1/applications/presets")));
  const storages = useLoad(() => unwrap(api.GET("/api/v1/storages")).then((a) => a.storages));
  const action = useAction();
  const [name, setName] = useState(environment.name);
  const [preset, setPreset] = useState(environment.preset);
  const [mounts, setMounts] = useState<Record<string, string>>(
    Object.fromEntries(environment.mounts.map((m) => [m.storage_id, m.mount_path])),
  );
  const [envText, setEnvText] = useState(
    Object.entries(environment.env)
      .map(([k, v]) => `${k}=${v}`)
      .join("\n"),
  );

  async function submit(event: FormEvent) {
    event.preventDefault();
    const ok = await action.run(async () => {
      const env: Record<string, string> = {};
      envText.split("\n").forEach((raw, index) => {
        const line = raw.trim();
        if (!line || line.startsWith("#")) return;
        const eq = line.indexOf("=");
        if (eq < 1) throw new Error(`Line ${index + 1} of the variables is not NAME=value.`);
        env[line.slice(0, eq).trim()] = line.slice(eq + 1);
      });
      if (!name.trim()) throw new Error("Give the environment a name.");
      await unwrap(
        api.PATCH("/api/v1/environments/{environment_id}", {
          params: { path: { environment_id: environment.id } },
          body: {
            name: name.trim(),
            ...(preset === environment.preset || preset === "custom" ? {} : { preset }),
            env,
            mounts: Object.entries(mounts).map(([storage_id, mount_path]) => ({ storage_id, mount_path, read_only: false })),
          },
        }),
      );
    });
    if (ok) onSaved();
  }

  return (
    <form onSubmit={submit}>
      <Field id="edit-name" label="Name" data-autofocus required maxLength={100} value={name} onChange={(e) => setName(e.target.value)} />
      <fieldset>
        <legend>Size</legend>
        {presets.loading ? <Loading /> : null}
        <ErrorMessage error={presets.error} />
        {presets.data?.presets.map((p) => (
          <label key={p.name} className="choice">
            <input
              type="radio"
              name="edit-preset"
              value={p.name}
              checked={preset === p.name}
              disabled={!p.available}
              onChange={() => setPreset(p.name)}
            />
            <span>
              <strong>{p.name}</strong> — {p.cpu} CPU, {formatMemory(p.memory_mib)} memory
            </span>
          </label>
        ))}
        {environment.preset === "custom" ? (
          <label className="choice">
            <input type="radio" name="edit-preset" checked={preset === "custom"} onChange={() => setPreset("custom")} />
            <span>
              <strong>custom</strong> — {environment.cpu} CPU, {formatMemory(environment.memory_mib)} memory (as now)
            </span>
          </label>
        ) : null}
      </fieldset>
      <fieldset>
        <legend>Buckets to mount</legend>
        <ErrorMessage error={storages.error} />
        {storages.data?.length === 0 ? <p className="muted">No bucket yet.</p> : null}
        {storages.data?.map((s) => (
          <div key={s.id} className="edit-mount">
            <label className="choice">
              <input
                type="checkbox"
                checked={s.id in mounts}
                onChange={(e) => {
                  const next = { ...mounts };
                  if (e.target.checked) next[s.id] = "/home/user/data";
                  else delete next[s.id];
                  setMounts(next);
                }}
              />
              <Name text={s.display_name} focusable={false} />
            </label>
            {s.id in mounts ? (
              <>
                <label htmlFor={`edit-mount-${s.id}`} className="visually-hidden">
                  Mount path for {s.display_name}
                </label>
                <input id={`edit-mount-${s.id}`} value={mounts[s.id]} onChange={(e) => setMounts({ ...mounts, [s.id]: e.target.value })} />
              </>
            ) : null}
          </div>
        ))}
      </fieldset>
      <label htmlFor="edit-vars">Environment variables (one NAME=value per line)</label>
      <textarea id="edit-vars" rows={3} value={envText} onChange={(e) => setEnvText(e.target.value)} />
      <ErrorMessage error={action.error} />
      <div className="actions">
        <button type="submit" className="primary" disabled={action.busy}>
          Save
        </button>
      </div>
    </form>
  );
}

/** When it stops by itself: idleness and maximum uptime, apart. */
function Deadlines({ env, now }: { env: Environment; now: number }) {
  if (!ACTIVE.has(env.status)) return <>—</>;
  const idle = env.idle_shutdown_at ? parseTime(env.idle_shutdown_at) - now : null;
  const uptime = env.uptime_shutdown_at ? parseTime(env.uptime_shutdown_at) - now : null;
  if (idle === null && uptime === null) return <>never</>;
  return (
    <span className={env.shutdown_warning ? "warn-text" : undefined} data-testid="deadlines">
      {idle !== null ? <span className="block">idle stop in {formatDuration(idle)}</span> : null}
      {uptime !== null ? <span className="block">uptime ends in {formatDuration(uptime)}</span> : null}
    </span>
  );
}

function Resources({ use, env }: { use: { cpu: number; memory_bytes: number } | undefined; env: Environment }) {
  if (!use) return <>—</>;
  return (
    <span className="meter" data-testid="resources">
      {use.cpu.toFixed(2)} of {env.cpu} CPU
      <br />
      {formatBytes(use.memory_bytes)} of {formatMemory(env.memory_mib)}
    </span>
  );
}

function LimitsLine({ limits }: { limits: Limits }) {
  return (
    <p className="muted limits" data-testid="limits">
      {limits.active} running of {limits.max_active} allowed. Without activity an environment stops after{" "}
      {formatMinutes(limits.idle_timeout_minutes)}; in any case after {formatMinutes(limits.max_uptime_minutes)}
      {limits.max_uptime_minutes && limits.max_extension_minutes
        ? ` (Extend adds up to ${formatMinutes(limits.max_extension_minutes)})`
        : ""}
      .
    </p>
  );
}

/** Where a page of an environment opens: its `enter` path, which leads into that environment only. */
function enterAddress(environmentId: string, page: string): string {
  const next = page ? `?next=${encodeURIComponent(page)}` : "";
  return `/api/v1/environments/${encodeURIComponent(environmentId)}/enter${next}`;
}

/** What the resume notice says of the environment, by its status. */
function resumeSays(status: string): string {
  if (status === "running") return "is running.";
  if (ACTIVE.has(status)) return "is starting: the page you asked for opens once it runs.";
  if (status === "failed") return "did not start: its output says why.";
  if (status === "stopping") return "is stopping. Once it has stopped, start it to open the page you asked for.";
  return "is stopped. Start it to open the page you asked for.";
}

/**
 * ?resume=<id>&next=<page>: the control plane sent a browser here from a page of a stopped
 * environment (a bookmark of a notebook, say). Start it here, and once it runs the browser goes
 * back to that page. An id that is not one of the person's environments shows nothing.
 */
function Resume({ env, page, busy, onStart }: { env: Environment; page: string; busy: boolean; onStart: () => void }) {
  const [wasDown, setWasDown] = useState(false);
  const running = env.status === "running";
  useEffect(() => {
    if (!running) setWasDown(true);
    else if (wasDown) window.location.assign(enterAddress(env.id, page)); // started from here: back to the page
  }, [running, wasDown, env.id, page]);
  const starting = ACTIVE.has(env.status) && !running;
  return (
    <div className="notice" role="status" data-testid="resume">
      <span>
        <Name text={env.name} className="inline" />{" "}
        {resumeSays(env.status)}
      </span>
      <div className="toolbar">
        {running ? (
          <a href={enterAddress(env.id, page)}>Open the page you asked for</a>
        ) : starting ? null : (
          <button
            type="button"
            disabled={busy || env.status === "stopping"}
            onClick={onStart}
            aria-label={`Start ${env.name} and open the page`}
          >
            Start and open
          </button>
        )}
      </div>
    </div>
  );
}

export default function EnvironmentsPage() {
  const list = useLoad(() => unwrap(api.GET("/api/v1/environments")));
  const { reload } = list;
  const action = useChange(reload);
  const now = useNow(1000);
  const [selected, setSelected] = useState<Set<string>>(new Set());
  const deleting = useConfirm<Environment[]>(action, (targets, close) => act(targets, "delete", close));
  const stopping = useConfirm<{ envs: Environment[]; verb: "stop" | "restart" }>(action, (target, close) =>
    act(target.envs, target.verb, close),
  );
  const [showingLogs, setShowingLogs] = useState<Environment | null>(null);
  const [logsFor, setLogsFor] = useState<string | null>(null);
  const [editing, setEditing] = useState<Environment | null>(null);
  const environments = list.data?.items ?? [];
  const running = environments.filter((env) => env.status === "running");
  const runningKey = running.map((env) => env.id).join(",");
  const resources = useLoad(
    () => (runningKey ? unwrap(api.GET("/api/v1/environments/resources")) : Promise.resolve(null)),
    [runningKey],
  );

  const [resume, setResume] = useState<{ id: string; page: string } | null>(null);

  // ?logs=<id>: the launch dialog's "Open its logs" link; ?resume=<id>&next=<page>: see Resume.
  useEffect(() => {
    const query = new URLSearchParams(window.location.search);
    setLogsFor(query.get("logs"));
    const resumeId = query.get("resume");
    if (resumeId) setResume({ id: resumeId, page: query.get("next") ?? "" });
  }, []);
  const resumed = resume ? environments.find((env) => env.id === resume.id) : undefined;
  useEffect(() => {
    if (!logsFor || !list.data) return;
    const env = list.data.items.find((e) => e.id === logsFor);
    if (env) setShowingLogs(env);
    setLogsFor(null);
  }, [logsFor, list.data]);

  // Poll while any environment is changing state, slower otherwise (shutdown times move too).
  const changing = environments.some((env) => TRANSITIONAL.has(env.status));
  useEffect(() => {
    const timer = setInterval(() => void reload(), changing ? 1500 : 15000);
    return () => clearInterval(timer);
  }, [changing, reload]);
  const reloadResources = resources.reload;
  useEffect(() => {
    if (!runningKey) return;
    const timer = setInterval(() => void reloadResources(), 5000);
    return () => clearInterval(timer);
  }, [runningKey, reloadResources]);

  /** Runs `verb` on every target; on success clears the selection and calls `onDone`. */
  async function act(targets: Environment[], verb: Verb | "delete" | "extend", onDone?: () => void) {
    await action.change(
      async () => {
        for (const env of targets) await perform(env, verb);
      },
      () => {
        if (verb !== "extend") setSelected(new Set());
        onDone?.();
      },
    );
  }

  /** Stop or restart: a running environment's work may be lost, so it asks first. */
  function askOrDo(targets: Environment[], verb: "stop" | "restart") {
    if (targets.some((env) => ACTIVE.has(env.status))) stopping.ask({ envs: targets, verb });
    else void act(targets, verb);
  }

  const chosen = environments.filter((env) => selected.has(env.id));
  const allSelected = environments.length > 0 && chosen.length === environments.length;
  const warnings = environments.filter((env) => env.shutdown_warning && env.shutdown_at && ACTIVE.has(env.status));
  const use = new Map((resources.data?.measured ? resources.data.items : []).map((item) => [item.environment_id, item]));
  const measured = resources.data?.measured ?? false;
  const deleteTargets = deleting.target ?? [];
  const keptBuckets = Array.from(new Set(deleteTargets.flatMap((env) => env.mounts.map((m) => m.display_name))));

  return (
    <>
      <h1>Environments</h1>
      {list.data ? <LimitsLine limits={list.data.limits} /> : null}
      {resume && resumed ? (
        <Resume env={resumed} page={resume.page} busy={action.busy} onStart={() => void act([resumed], "start")} />
      ) : null}
      {warnings.map((env) => {
        const idleFirst =
          env.idle_shutdown_at !== null &&
          (env.uptime_shutdown_at === null || parseTime(env.idle_shutdown_at) <= parseTime(env.uptime_shutdown_at));
        return (
          <div key={env.id} className="warning toolbar" role="alert">
            <span>
              <Name text={env.name} className="inline" /> stops automatically in{" "}
              {formatDuration(parseTime(env.shutdown_at as string) - now)}
              {idleFirst ? " (nobody has used it for a while)" : " (it reaches its maximum uptime)"}: save your work
              (your files in mounted buckets stay).
            </span>
            {env.extendable ? (
              <button type="button" disabled={action.busy} onClick={() => act([env], "extend")} aria-label={`Extend ${env.name}`}>
                {idleFirst ? "Keep it running" : "Extend by 1 hour"}
              </button>
            ) : null}
          </div>
        );
      })}
      <LoadState
        load={list}
        actionError={action.error}
        what="Loading your environments"
        empty={list.data && environments.length === 0}
      >
        You have no environment. <Link href="/applications/">Launch an application</Link>.
      </LoadState>
      {environments.length > 0 ? (
        <>
          <div className="toolbar" role="group" aria-label="Actions on the selected environments">
            <span className="muted">{chosen.length} selected</span>
            <button type="button" disabled={!chosen.length || action.busy} onClick={() => act(chosen, "start")}>
              Start selected
            </button>
            <button type="button" disabled={!chosen.length || action.busy} onClick={() => askOrDo(chosen, "stop")}>
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
                key="all"
                type="checkbox"
                aria-label="Select all environments"
                checked={allSelected}
                onChange={(e) => setSelected(new Set(e.target.checked ? environments.map((env) => env.id) : []))}
              />,
              "Name",
              "Status",
              "Uptime",
              "Stops",
              ...(measured ? ["In use"] : []),
              "Actions",
            ]}
          >
            {environments.map((env) => (
              <tr key={env.id} data-environment={env.name}>
                <td className="col-check">
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
                  <Name text={env.name} />
                  <div className="muted small">
                    {env.application.name} · {env.preset} · {env.cpu} CPU · {formatMemory(env.memory_mib)}
                    {env.mounts.length ? ` · ${env.mounts.map((m) => m.display_name).join(", ")}` : ""}
                  </div>
                </th>
                <Td label="Status">
                  <StatusBadge status={env.status} />
                  {reason(env.status, env.status_message) ? (
                    <div className="muted small">{reason(env.status, env.status_message)}</div>
                  ) : null}
                </Td>
                <Td label="Uptime">
                  {env.status === "running" && env.started_at ? formatDuration(now - parseTime(env.started_at)) : "—"}
                </Td>
                <Td label="Stops">
                  <Deadlines env={env} now={now} />
                </Td>
                {measured ? (
                  <Td label="In use">
                    <Resources use={use.get(env.id)} env={env} />
                  </Td>
                ) : null}
                <td className="row-actions">
                  {env.status === "running" && env.url ? (
                    <a className="button primary" href={env.url} target="_blank" rel="noopener noreferrer" aria-label={`Open ${env.name}`}>
                      Open
                    </a>
                  ) : null}
                  {ACTIVE.has(env.status) ? (
                    <button type="button" disabled={action.busy} onClick={() => askOrDo([env], "stop")} aria-label={`Stop ${env.name}`}>
                      Stop
                    </button>
                  ) : (
                    <button type="button" disabled={action.busy} onClick={() => act([env], "start")} aria-label={`Start ${env.name}`}>
                      Start
                    </button>
                  )}
                  {ACTIVE.has(env.status) ? ( // a stopped one has Start: a restart would be the same
                    <button type="button" disabled={action.busy} onClick={() => askOrDo([env], "restart")} aria-label={`Restart ${env.name}`}>
                      Restart
                    </button>
                  ) : null}
                  {ACTIVE.has(env.status) ? null : (
                    <button type="button" disabled={action.busy} onClick={() => setEditing(env)} aria-label={`Edit ${env.name}`}>
                      Edit
                    </button>
                  )}
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
      <Dialog
        open={showingLogs !== null}
        title={showingLogs ? `Logs of ${showingLogs.name}` : "Logs"}
        onClose={() => setShowingLogs(null)}
      >
        {showingLogs ? <Logs environment={showingLogs} /> : null}
      </Dialog>
      <Dialog open={editing !== null} title={editing ? `Edit ${editing.name}` : "Edit"} onClose={() => setEditing(null)}>
        {editing ? (
          <EditForm
            key={editing.id}
            environment={editing}
            onSaved={() => {
              setEditing(null);
              void reload();
            }}
          />
        ) : null}
      </Dialog>
      <Confirm
        {...stopping.dialog}
        title={stopping.target?.verb === "restart" ? "Restart environment" : "Stop environment"}
        confirmLabel={stopping.target?.verb === "restart" ? "Restart" : "Stop"}
      >
        <p>
          {stopping.target?.verb === "restart" ? "Restart" : "Stop"} {stopping.target?.envs.map((env) => env.name).join(", ")}?
          Its application stops: open notebooks lose their kernels and unsaved changes. Files saved in its home folder
          and in your buckets stay{stopping.target?.verb === "restart" ? "; it starts again with the same choices" : ""}.
        </p>
      </Confirm>
      <Confirm
        {...deleting.dialog}
        title={deleteTargets.length === 1 ? "Delete environment" : `Delete ${deleteTargets.length} environments`}
        confirmLabel="Delete"
      >
        <p>Delete {deleteTargets.map((env) => env.name).join(", ")}?</p>
        <p>
          <strong>Goes:</strong> the environment, its settings (size, variables, where buckets are mounted) and its own
          home folder: any file saved there rather than in a bucket.
        </p>
        <p>
          <strong>Stays:</strong>{" "}
          {keptBuckets.length
            ? `your buckets (${keptBuckets.join(", ")}) and every file in them`
            : "your buckets and every file in them"}
          , and your secret files and variables in Settings.
        </p>
      </Confirm>
    </>
  );
}
