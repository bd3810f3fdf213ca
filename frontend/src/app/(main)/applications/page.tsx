"use client";

import Link from "next/link";
import { type FormEvent, useState } from "react";
import { Dialog, ErrorMessage, Field, Loading, LoadState, Name, useAction, useLoad } from "@/components/ui";
import { type Application, api, type Environment, type Limits, unwrap } from "@/lib/api";
import { formatMemory } from "@/lib/format";
import { useProgress } from "@/lib/progress";

/** "KEY=value" lines into variables; an error naming the first bad line. */
function parseEnvLines(text: string): Record<string, string> {
  const env: Record<string, string> = {};
  text.split("\n").forEach((raw, index) => {
    const line = raw.trim();
    if (!line || line.startsWith("#")) return;
    const eq = line.indexOf("=");
    if (eq < 1) throw new Error(`Line ${index + 1} of the variables is not NAME=value.`);
    env[line.slice(0, eq).trim()] = line.slice(eq + 1);
  });
  return env;
}

function LaunchProgress({ environment }: { environment: Environment }) {
  const progress = useProgress(environment.id);
  const status = progress?.status ?? environment.status;
  const value = progress?.progress ?? 0;
  const logsHref = `/environments/?logs=${encodeURIComponent(environment.id)}`;
  if (status === "failed") {
    return (
      <div className="launch-progress">
        <div className="failed-box" role="alert">
          <strong>
            <span data-testid="launch-status">failed</span>: {environment.name} did not start.
          </strong>
          <span data-testid="launch-reason">{progress?.message || "It stopped before it was ready."}</span>
          <span>
            <Link href={logsHref}>Open its logs</Link> (they end with what went wrong).
          </span>
        </div>
        <p>
          <Link href="/environments/">Go to my environments</Link>
        </p>
      </div>
    );
  }
  return (
    <div className="launch-progress">
      <label htmlFor="launch-progress">
        <Name text={environment.name} focusable={false} className="inline" />{" "}
        <strong data-testid="launch-status">{status}</strong>
        {progress?.message ? <span className="muted"> — {progress.message}</span> : null}
      </label>
      <progress id="launch-progress" max={100} value={value} aria-valuetext={`${status}, ${value}%`} />
      {progress?.log.length ? (
        <pre className="logs launch-output" aria-label={`Output of ${environment.name} while it starts`} data-testid="launch-output">
          {progress.log.join("\n")}
        </pre>
      ) : null}
      <p aria-live="polite" className="toolbar">
        {status === "running" && progress?.url ? (
          <a className="button primary" href={progress.url} target="_blank" rel="noopener noreferrer">
            Open {environment.name}
          </a>
        ) : null}
        <Link href={logsHref}>Logs</Link>
        <Link href="/environments/">Go to my environments</Link>
      </p>
    </div>
  );
}

/** Where a bucket mounted at `path` appears, in words: "/home/user/data (the folder data of its home)". */
function whereItAppears(path: string): string {
  const inHome = /^\/home\/[^/]+\/(.+)$/.exec(path.replace(/\/+$/, ""));
  return inHome ? `${path}: the folder ${inHome[1]} of its home` : path;
}

const DEFAULT_MOUNT = "/home/user/data";

/** Where a newly ticked bucket goes: /home/user/data, else the first of /home/user/data-2, -3… that no
 * other ticked bucket uses (the server refuses two buckets at one path). */
function freeMountPath(taken: string[]): string {
  const used = new Set(taken.map((path) => path.replace(/\/+$/, "")));
  if (!used.has(DEFAULT_MOUNT)) return DEFAULT_MOUNT;
  let n = 2;
  while (used.has(`${DEFAULT_MOUNT}-${n}`)) n += 1;
  return `${DEFAULT_MOUNT}-${n}`;
}

function LaunchForm({
  application,
  limits,
  onLaunched,
}: {
  application: Application;
  limits: Limits | undefined;
  onLaunched: (env: Environment) => void;
}) {
  const presets = useLoad(() => unwrap(api.GET("/api/v1/applications/presets")));
  const action = useAction();
  const [name, setName] = useState("");
  const [preset, setPreset] = useState(application.default_preset);
  const [mounts, setMounts] = useState<Record<string, string>>({});
  const [envText, setEnvText] = useState("");
  // A person with exactly one bucket almost always wants it: it is ticked from the start.
  const storages = useLoad(() =>
    unwrap(api.GET("/api/v1/storages")).then((a) => {
      const usable = a.storages.filter((s) => s.status === "active");
      if (usable.length === 1) setMounts({ [usable[0].id]: DEFAULT_MOUNT });
      return a.storages;
    }),
  );
  const full = limits !== undefined && limits.active >= limits.max_active;

  async function submit(event: FormEvent) {
    event.preventDefault();
    await action.run(async () => {
      const env = parseEnvLines(envText);
      const created = await unwrap(
        api.POST("/api/v1/environments", {
          body: {
            application: application.id,
            name: name.trim() || null,
            preset,
            env,
            start: true,
            mounts: Object.entries(mounts).map(([storage_id, mount_path]) => ({ storage_id, mount_path, read_only: false })),
          },
        }),
      );
      onLaunched(created);
    });
  }

  return (
    <form onSubmit={submit}>
      {limits ? <LimitsNote limits={limits} /> : null}
      <Field
        id="env-name"
        label="Name (optional)"
        data-autofocus
        value={name}
        maxLength={100}
        onChange={(e) => setName(e.target.value)}
        placeholder={application.name}
      />
      <fieldset>
        <legend>Resources</legend>
        {presets.loading ? <Loading /> : null}
        <ErrorMessage error={presets.error} />
        {presets.data?.presets.map((p) => (
          <label key={p.name} className="choice">
            <input
              type="radio"
              name="preset"
              value={p.name}
              checked={preset === p.name}
              disabled={!p.available}
              onChange={() => setPreset(p.name)}
            />
            <span>
              <strong>{p.name}</strong> — {p.cpu} CPU, {formatMemory(p.memory_mib)} memory
              {p.available ? "" : " (above this server's limits)"}
            </span>
          </label>
        ))}
      </fieldset>
      <fieldset>
        <legend>Storage to mount</legend>
        {storages.loading ? <Loading /> : null}
        <ErrorMessage error={storages.error} />
        {storages.data?.length === 0 ? (
          <p className="muted">
            No bucket yet: <Link href="/storage/">create one</Link> to keep your files.
          </p>
        ) : null}
        {storages.data?.map((s) => (
          <div key={s.id} className="mount">
            <label className="choice">
              <input
                type="checkbox"
                checked={s.id in mounts}
                onChange={(e) => {
                  const next = { ...mounts };
                  if (e.target.checked) next[s.id] = freeMountPath(Object.values(mounts));
                  else delete next[s.id];
                  setMounts(next);
                }}
              />
              <Name text={s.display_name} focusable={false} />
            </label>
            {s.id in mounts ? (
              <>
                <label htmlFor={`mount-${s.id}`} className="visually-hidden">
                  Mount path for {s.display_name}
                </label>
                <input
                  id={`mount-${s.id}`}
                  value={mounts[s.id]}
                  aria-describedby={`where-${s.id}`}
                  onChange={(e) => setMounts({ ...mounts, [s.id]: e.target.value })}
                />
                <p className="muted small" id={`where-${s.id}`} data-testid="mount-where">
                  Its files appear in the environment at {whereItAppears(mounts[s.id])}.
                </p>
              </>
            ) : null}
          </div>
        ))}
      </fieldset>
      <label htmlFor="env-vars">Environment variables (one NAME=value per line)</label>
      <textarea id="env-vars" rows={3} value={envText} onChange={(e) => setEnvText(e.target.value)} />
      <ErrorMessage error={action.error} />
      <div className="actions">
        <button type="submit" className="primary" disabled={action.busy || full}>
          {action.busy ? "Launching…" : "Launch"}
        </button>
      </div>
    </form>
  );
}

/** "1 running of 3 allowed", before anyone is refused. */
function LimitsNote({ limits }: { limits: Limits }) {
  const full = limits.active >= limits.max_active;
  return (
    <p className={full ? "warning limits" : "muted limits"} data-testid="limits">
      {limits.active} running of {limits.max_active} allowed
      {full ? ": stop one on the Environments page to launch another." : "."}
    </p>
  );
}

export default function ApplicationsPage() {
  const catalog = useLoad(() => unwrap(api.GET("/api/v1/applications")).then((a) => a.items));
  const mine = useLoad(() => unwrap(api.GET("/api/v1/environments")));
  const [chosen, setChosen] = useState<Application | null>(null);
  const [launched, setLaunched] = useState<Environment | null>(null);

  function close() {
    setChosen(null);
    setLaunched(null);
    void mine.reload();
  }

  return (
    <>
      <h1>Applications</h1>
      {mine.data ? <LimitsNote limits={mine.data.limits} /> : null}
      <LoadState load={catalog} what="Loading the catalog" empty={catalog.data?.length === 0}>
        The catalog is empty; an administrator adds applications.
      </LoadState>
      <ul className="catalog">
        {catalog.data?.map((app) => (
          <li key={app.id} className="card">
            <div className="app-head">
              {app.icon ? <img src={app.icon} alt="" width={40} height={40} /> : <span className="app-icon" aria-hidden="true" />}
              <h2>
                <Name text={app.name} focusable={false} />
              </h2>
            </div>
            <p>{app.summary}</p>
            <p className="muted small">
              {app.category}
              {app.tags.length ? ` · ${app.tags.join(", ")}` : ""}
            </p>
            {app.available ? null : (
              <p className="warning small" role="note" aria-label={`${app.name} is not installed`}>
                {app.unavailable_reason}
              </p>
            )}
            <button
              type="button"
              className="primary"
              onClick={() => setChosen(app)}
              aria-label={`Launch ${app.name}`}
              disabled={!app.available}
            >
              Launch
            </button>
          </li>
        ))}
      </ul>
      <Dialog open={chosen !== null} title={chosen ? `Launch ${chosen.name}` : "Launch"} onClose={close}>
        {launched ? (
          <LaunchProgress environment={launched} />
        ) : chosen ? (
          <LaunchForm
            application={chosen}
            limits={mine.data?.limits}
            onLaunched={(environment) => {
              setLaunched(environment);
              void mine.reload(); // the page behind the dialog counts it at once
            }}
          />
        ) : null}
      </Dialog>
    </>
  );
}
