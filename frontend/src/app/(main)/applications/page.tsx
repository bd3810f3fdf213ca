"use client";

import Link from "next/link";
import { type FormEvent, useState } from "react";
import { Dialog, ErrorMessage, Loading, LoadState, useAction, useLoad } from "@/components/ui";
import { type Application, api, type Environment, unwrap } from "@/lib/api";
import { formatBytes } from "@/lib/format";
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
  return (
    <div className="launch-progress">
      <label htmlFor="launch-progress">
        {environment.name}: <strong data-testid="launch-status">{status}</strong>
        {progress?.message ? <span className="muted"> — {progress.message}</span> : null}
      </label>
      <progress id="launch-progress" max={100} value={value} aria-valuetext={`${status}, ${value}%`} />
      {progress?.log.length ? (
        <pre className="logs launch-output" aria-label={`Output of ${environment.name} while it starts`} data-testid="launch-output">
          {progress.log.join("\n")}
        </pre>
      ) : null}
      <p aria-live="polite">
        {status === "running" && progress?.url ? (
          <a className="button primary" href={progress.url} target="_blank" rel="noopener noreferrer">
            Open {environment.name}
          </a>
        ) : status === "failed" ? (
          <span className="error">It failed to start: {progress?.message || "see its logs"}.</span>
        ) : null}{" "}
        <Link href="/environments/">Go to my environments</Link>
      </p>
    </div>
  );
}

function LaunchForm({ application, onLaunched }: { application: Application; onLaunched: (env: Environment) => void }) {
  const presets = useLoad(() => unwrap(api.GET("/api/v1/applications/presets")));
  const storages = useLoad(() => unwrap(api.GET("/api/v1/storages")).then((a) => a.storages));
  const action = useAction();
  const [name, setName] = useState("");
  const [preset, setPreset] = useState(application.default_preset);
  const [mounts, setMounts] = useState<Record<string, string>>({});
  const [envText, setEnvText] = useState("");

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
      <label htmlFor="env-name">Name (optional)</label>
      <input id="env-name" data-autofocus value={name} maxLength={100} onChange={(e) => setName(e.target.value)} placeholder={application.name} />
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
            <strong>{p.name}</strong> — {p.cpu} CPU, {formatBytes(p.memory_mib * 1024 * 1024)} memory
            {p.available ? "" : " (above this server's limits)"}
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
                  if (e.target.checked) next[s.id] = "/home/user/data";
                  else delete next[s.id];
                  setMounts(next);
                }}
              />
              {s.display_name}
            </label>
            {s.id in mounts ? (
              <>
                <label htmlFor={`mount-${s.id}`} className="visually-hidden">
                  Mount path for {s.display_name}
                </label>
                <input
                  id={`mount-${s.id}`}
                  value={mounts[s.id]}
                  onChange={(e) => setMounts({ ...mounts, [s.id]: e.target.value })}
                />
              </>
            ) : null}
          </div>
        ))}
      </fieldset>
      <label htmlFor="env-vars">Environment variables (one NAME=value per line)</label>
      <textarea id="env-vars" rows={3} value={envText} onChange={(e) => setEnvText(e.target.value)} />
      <ErrorMessage error={action.error} />
      <div className="actions">
        <button type="submit" className="primary" disabled={action.busy}>
          {action.busy ? "Launching…" : "Launch"}
        </button>
      </div>
    </form>
  );
}

export default function ApplicationsPage() {
  const catalog = useLoad(() => unwrap(api.GET("/api/v1/applications")).then((a) => a.items));
  const [chosen, setChosen] = useState<Application | null>(null);
  const [launched, setLaunched] = useState<Environment | null>(null);

  function close() {
    setChosen(null);
    setLaunched(null);
  }

  return (
    <>
      <h1>Applications</h1>
      <LoadState load={catalog} what="Loading the catalog" empty={catalog.data?.length === 0}>
        The catalog is empty; an administrator adds applications.
      </LoadState>
      <ul className="catalog">
        {catalog.data?.map((app) => (
          <li key={app.id} className="card">
            <div className="app-head">
              {app.icon ? <img src={app.icon} alt="" width={40} height={40} /> : <span className="app-icon" aria-hidden="true" />}
              <h2>{app.name}</h2>
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
          <LaunchForm application={chosen} onLaunched={setLaunched} />
        ) : null}
      </Dialog>
    </>
  );
}
