"use client";

import { useState } from "react";
import { useUser } from "@/components/Shell";
import { Card, DangerButton, Field, InlineForm, LoadState, Name, useChange, useLoad } from "@/components/ui";
import { api, unwrap, uploadFile } from "@/lib/api";
import { formatBytes, formatTime } from "@/lib/format";

function Profile() {
  const user = useUser();
  return (
    <Card id="profile" title="Profile">
      <dl className="facts">
        <dt>Name</dt>
        <dd>
          <Name text={user.name || "—"} />
        </dd>
        <dt>E-mail</dt>
        <dd>
          <Name text={user.email} />
        </dd>
        <dt>Role</dt>
        <dd>{user.role}</dd>
        <dt>Member since</dt>
        <dd>{formatTime(user.created_at)}</dd>
      </dl>
    </Card>
  );
}

function EnvVars() {
  const list = useLoad(() => unwrap(api.GET("/api/v1/settings/env-vars")));
  const action = useChange(list.reload);
  const [name, setName] = useState("");
  const [value, setValue] = useState("");

  async function submit() {
    await action.change(
      () => unwrap(api.PUT("/api/v1/settings/env-vars/{name}", { params: { path: { name } }, body: { value } })),
      () => {
        setName("");
        setValue("");
      },
    );
  }

  async function remove(varName: string) {
    await action.change(() => unwrap(api.DELETE("/api/v1/settings/env-vars/{name}", { params: { path: { name: varName } } })));
  }

  return (
    <Card id="env-vars-title" title="Environment variables">
      <p className="muted">
        Given to every environment you start, from its next start, as ordinary environment variables (in a notebook:{" "}
        <code>os.environ[&quot;NAME&quot;]</code>; in a terminal: <code>$NAME</code>). An environment&apos;s own variables,
        chosen when launching it, win over these.
      </p>
      <LoadState load={list} empty={list.data?.length === 0}>
        No variable yet.
      </LoadState>
      <ul className="plain">
        {list.data?.map((v) => (
          <li key={v.name} className="row">
            <code className="name" title={`${v.name}=${v.value}`} tabIndex={0}>
              {v.name}={v.value}
            </code>
            {v.unreadable && (
              <span className="muted">
                cannot be decrypted (the server&apos;s key changed): set it again
              </span>
            )}
            <DangerButton label={`Delete variable ${v.name}`} onClick={() => remove(v.name)} />
          </li>
        ))}
      </ul>
      <InlineForm onSubmit={submit} submitLabel="Save variable" busy={action.busy} error={action.error}>
        <Field
          id="var-name"
          label="Name"
          required
          pattern="[A-Za-z_][A-Za-z0-9_]*"
          maxLength={128}
          value={name}
          onChange={(e) => setName(e.target.value)}
        />
        <Field id="var-value" label="Value" value={value} onChange={(e) => setValue(e.target.value)} />
      </InlineForm>
    </Card>
  );
}

function SecretFiles() {
  const list = useLoad(() => unwrap(api.GET("/api/v1/settings/secret-files")));
  const action = useChange(list.reload);
  const [name, setName] = useState("");
  const [file, setFile] = useState<File | null>(null);
  // A new key gives a new, empty file picker once a file is uploaded.
  const [picker, setPicker] = useState(0);

  async function submit() {
    if (!file) return;
    const target = name.trim() || file.name;
    await action.change(
      () => uploadFile(`/api/v1/settings/secret-files/${encodeURIComponent(target)}`, file, () => undefined),
      () => {
        setName("");
        setFile(null);
        setPicker((n) => n + 1);
      },
    );
  }

  async function remove(fileName: string) {
    await action.change(() =>
      unwrap(api.DELETE("/api/v1/settings/secret-files/{name}", { params: { path: { name: fileName } } })),
    );
  }

  return (
    <Card id="secret-files-title" title="Secret files">
      <p className="muted">
        Encrypted here and never shown again. Inside each environment you start, they are files in the folder named by
        the variable <code>$CMBCLUSTER_SECRETS_DIR</code> (in Python:{" "}
        <code>os.path.join(os.environ[&quot;CMBCLUSTER_SECRETS_DIR&quot;], &quot;name&quot;)</code>), readable by you only;
        an environment running already gets them at its next start.
      </p>
      <LoadState load={list} empty={list.data?.length === 0}>
        No secret file yet.
      </LoadState>
      <ul className="plain">
        {list.data?.map((f) => (
          <li key={f.name} className="row">
            <span>
              <code>{f.name}</code> <span className="muted">{formatBytes(f.size)}</span>
            </span>
            <DangerButton label={`Delete secret file ${f.name}`} onClick={() => remove(f.name)} />
          </li>
        ))}
      </ul>
      <InlineForm onSubmit={submit} submitLabel="Upload secret file" busy={action.busy} disabled={!file} error={action.error}>
        <Field
          key={picker}
          id="secret-file"
          label="File"
          type="file"
          required
          onChange={(e) => setFile(e.target.files?.[0] ?? null)}
        />
        <Field id="secret-name" label="Name (optional)" maxLength={128} value={name} onChange={(e) => setName(e.target.value)} />
      </InlineForm>
    </Card>
  );
}

function Tokens() {
  const list = useLoad(() => unwrap(api.GET("/api/v1/settings/tokens")));
  const action = useChange(list.reload);
  const [name, setName] = useState("");
  const [days, setDays] = useState("90");
  const [created, setCreated] = useState<string | null>(null);

  async function submit() {
    await action.change(async () => {
      const answer = await unwrap(
        api.POST("/api/v1/settings/tokens", { body: { name, expires_in_days: days ? Number(days) : null } }),
      );
      setCreated(answer.token);
      setName("");
    });
  }

  async function revoke(id: string) {
    await action.change(() => unwrap(api.DELETE("/api/v1/settings/tokens/{token_id}", { params: { path: { token_id: id } } })));
  }

  return (
    <Card id="tokens-title" title="API tokens">
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
      <LoadState load={list} empty={list.data?.length === 0}>
        No token yet.
      </LoadState>
      <ul className="plain">
        {list.data?.map((t) => (
          <li key={t.id} className="row">
            <span>
              <strong>{t.name}</strong> <code>{t.display_prefix}…</code>{" "}
              <span className="muted small">
                expires {t.expires_at ? formatTime(t.expires_at) : "never"}, last used {formatTime(t.last_used_at)}
              </span>
            </span>
            <DangerButton label={`Revoke token ${t.name}`} onClick={() => revoke(t.id)}>
              Revoke
            </DangerButton>
          </li>
        ))}
      </ul>
      <InlineForm onSubmit={submit} submitLabel="Create token" busy={action.busy} error={action.error}>
        <Field id="token-name" label="Token name" required maxLength={100} value={name} onChange={(e) => setName(e.target.value)} />
        <Field
          id="token-days"
          label="Expires after (days, empty: never)"
          type="number"
          min={1}
          max={365}
          value={days}
          onChange={(e) => setDays(e.target.value)}
        />
      </InlineForm>
    </Card>
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
