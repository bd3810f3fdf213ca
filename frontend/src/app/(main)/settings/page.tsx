"use client";

import { type FormEvent, useState } from "react";
import { useUser } from "@/components/Shell";
import { Empty, ErrorMessage, Loading, useAction, useLoad } from "@/components/ui";
import { api, unwrap, uploadFile } from "@/lib/api";
import { formatBytes, formatTime } from "@/lib/format";

function Profile() {
  const user = useUser();
  return (
    <section className="card" aria-labelledby="profile">
      <h2 id="profile">Profile</h2>
      <dl className="facts">
        <dt>Name</dt>
        <dd>{user.name || "—"}</dd>
        <dt>E-mail</dt>
        <dd>{user.email}</dd>
        <dt>Role</dt>
        <dd>{user.role}</dd>
        <dt>Member since</dt>
        <dd>{formatTime(user.created_at)}</dd>
      </dl>
    </section>
  );
}

function EnvVars() {
  const list = useLoad(() => unwrap(api.GET("/api/v1/settings/env-vars")));
  const action = useAction();
  const [name, setName] = useState("");
  const [value, setValue] = useState("");

  async function submit(event: FormEvent) {
    event.preventDefault();
    const ok = await action.run(() =>
      unwrap(api.PUT("/api/v1/settings/env-vars/{name}", { params: { path: { name } }, body: { value } })),
    );
    if (ok) {
      setName("");
      setValue("");
    }
    await list.reload();
  }

  async function remove(varName: string) {
    await action.run(() => unwrap(api.DELETE("/api/v1/settings/env-vars/{name}", { params: { path: { name: varName } } })));
    await list.reload();
  }

  return (
    <section className="card" aria-labelledby="env-vars-title">
      <h2 id="env-vars-title">Environment variables</h2>
      <p className="muted">Given to every environment you start (at its next start).</p>
      <ErrorMessage error={list.error} />
      {list.loading ? <Loading /> : null}
      {list.data?.length === 0 ? <Empty>No variable yet.</Empty> : null}
      <ul className="plain">
        {list.data?.map((v) => (
          <li key={v.name} className="row">
            <code>
              {v.name}={v.value}
            </code>
            <button type="button" className="danger" aria-label={`Delete variable ${v.name}`} onClick={() => remove(v.name)}>
              Delete
            </button>
          </li>
        ))}
      </ul>
      <form className="inline-form" onSubmit={submit}>
        <div>
          <label htmlFor="var-name">Name</label>
          <input id="var-name" required pattern="[A-Za-z_][A-Za-z0-9_]*" maxLength={128} value={name} onChange={(e) => setName(e.target.value)} />
        </div>
        <div>
          <label htmlFor="var-value">Value</label>
          <input id="var-value" value={value} onChange={(e) => setValue(e.target.value)} />
        </div>
        <button type="submit" disabled={action.busy}>
          Save variable
        </button>
      </form>
      <ErrorMessage error={action.error} />
    </section>
  );
}

function SecretFiles() {
  const list = useLoad(() => unwrap(api.GET("/api/v1/settings/secret-files")));
  const action = useAction();
  const [name, setName] = useState("");
  const [file, setFile] = useState<File | null>(null);

  async function submit(event: FormEvent) {
    event.preventDefault();
    if (!file) return;
    const target = name.trim() || file.name;
    const ok = await action.run(() =>
      uploadFile(`/api/v1/settings/secret-files/${encodeURIComponent(target)}`, file, () => undefined),
    );
    if (ok) {
      setName("");
      setFile(null);
    }
    await list.reload();
  }

  async function remove(fileName: string) {
    await action.run(() =>
      unwrap(api.DELETE("/api/v1/settings/secret-files/{name}", { params: { path: { name: fileName } } })),
    );
    await list.reload();
  }

  return (
    <section className="card" aria-labelledby="secret-files-title">
      <h2 id="secret-files-title">Secret files</h2>
      <p className="muted">Encrypted here, readable only by you inside your environments. Their content is never shown again.</p>
      <ErrorMessage error={list.error} />
      {list.loading ? <Loading /> : null}
      {list.data?.length === 0 ? <Empty>No secret file yet.</Empty> : null}
      <ul className="plain">
        {list.data?.map((f) => (
          <li key={f.name} className="row">
            <span>
              <code>{f.name}</code> <span className="muted">{formatBytes(f.size)}</span>
            </span>
            <button type="button" className="danger" aria-label={`Delete secret file ${f.name}`} onClick={() => remove(f.name)}>
              Delete
            </button>
          </li>
        ))}
      </ul>
      <form className="inline-form" onSubmit={submit}>
        <div>
          <label htmlFor="secret-file">File</label>
          <input id="secret-file" type="file" required onChange={(e) => setFile(e.target.files?.[0] ?? null)} />
        </div>
        <div>
          <label htmlFor="secret-name">Name (optional)</label>
          <input id="secret-name" maxLength={128} value={name} onChange={(e) => setName(e.target.value)} />
        </div>
        <button type="submit" disabled={action.busy || !file}>
          Upload secret file
        </button>
      </form>
      <ErrorMessage error={action.error} />
    </section>
  );
}

function Tokens() {
  const list = useLoad(() => unwrap(api.GET("/api/v1/settings/tokens")));
  const action = useAction();
  const [name, setName] = useState("");
  const [days, setDays] = useState("90");
  const [created, setCreated] = useState<string | null>(null);

  async function submit(event: FormEvent) {
    event.preventDefault();
    await action.run(async () => {
      const answer = await unwrap(
        api.POST("/api/v1/settings/tokens", { body: { name, expires_in_days: days ? Number(days) : null } }),
      );
      setCreated(answer.token);
      setName("");
    });
    await list.reload();
  }

  async function revoke(id: string) {
    await action.run(() => unwrap(api.DELETE("/api/v1/settings/tokens/{token_id}", { params: { path: { token_id: id } } })));
    await list.reload();
  }

  return (
    <section className="card" aria-labelledby="tokens-title">
      <h2 id="tokens-title">API tokens</h2>
      <p className="muted">For scripts: send as <code>Authorization: Bearer &lt;token&gt;</code>.</p>
      {created ? (
        <div className="notice" role="status">
          <p>Copy your new token now: it is shown this once only.</p>
          <label htmlFor="new-token" className="visually-hidden">
            New token
          </label>
          <input id="new-token" readOnly value={created} onFocus={(e) => e.target.select()} />
          <button type="button" onClick={() => void navigator.clipboard?.writeText(created)}>
            Copy
          </button>
          <button type="button" onClick={() => setCreated(null)}>
            Done
          </button>
        </div>
      ) : null}
      <ErrorMessage error={list.error} />
      {list.loading ? <Loading /> : null}
      {list.data?.length === 0 ? <Empty>No token yet.</Empty> : null}
      <ul className="plain">
        {list.data?.map((t) => (
          <li key={t.id} className="row">
            <span>
              <strong>{t.name}</strong> <code>{t.display_prefix}…</code>{" "}
              <span className="muted small">
                expires {t.expires_at ? formatTime(t.expires_at) : "never"}, last used {formatTime(t.last_used_at)}
              </span>
            </span>
            <button type="button" className="danger" aria-label={`Revoke token ${t.name}`} onClick={() => revoke(t.id)}>
              Revoke
            </button>
          </li>
        ))}
      </ul>
      <form className="inline-form" onSubmit={submit}>
        <div>
          <label htmlFor="token-name">Token name</label>
          <input id="token-name" required maxLength={100} value={name} onChange={(e) => setName(e.target.value)} />
        </div>
        <div>
          <label htmlFor="token-days">Expires after (days, empty: never)</label>
          <input id="token-days" type="number" min={1} max={365} value={days} onChange={(e) => setDays(e.target.value)} />
        </div>
        <button type="submit" disabled={action.busy}>
          Create token
        </button>
      </form>
      <ErrorMessage error={action.error} />
    </section>
  );
}

export default function SettingsPage() {
  return (
    <>
      <h1>Settings</h1>
      <div className="stack">
        <Profile />
        <EnvVars />
        <SecretFiles />
        <Tokens />
      </div>
    </>
  );
}
