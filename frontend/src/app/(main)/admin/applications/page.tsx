"use client";

import { type ChangeEvent, type FormEvent, useState } from "react";
import { AdminNav } from "@/components/AdminNav";
import { Confirm, DangerButton, DataTable, Dialog, ErrorMessage, Field, LoadState, useAction, useChange, useConfirm, useLoad } from "@/components/ui";
import { type Application, api, unwrap } from "@/lib/api";

const MAX_ICON_BYTES = 64 * 1024;

interface Draft {
  slug: string;
  name: string;
  summary: string;
  image: string;
  command: string;
  port: string;
  working_dir: string;
  icon: string;
  category: string;
  tags: string;
  default_preset: string;
  active: boolean;
}

const EMPTY: Draft = {
  slug: "", name: "", summary: "", image: "", command: "", port: "8080", working_dir: "", icon: "",
  category: "", tags: "", default_preset: "standard", active: true,
};

function draftOf(app: Application): Draft {
  return {
    slug: app.slug, name: app.name, summary: app.summary, image: app.image, command: app.command.join("\n"),
    port: String(app.port), working_dir: app.working_dir, icon: app.icon, category: app.category,
    tags: app.tags.join(", "), default_preset: app.default_preset, active: app.active,
  };
}

function bodyOf(draft: Draft) {
  return {
    slug: draft.slug.trim(),
    name: draft.name.trim(),
    summary: draft.summary,
    image: draft.image.trim(),
    command: draft.command.split("\n").map((arg) => arg.trim()).filter(Boolean),
    port: Number(draft.port),
    working_dir: draft.working_dir.trim(),
    icon: draft.icon,
    category: draft.category.trim(),
    tags: draft.tags.split(",").map((tag) => tag.trim()).filter(Boolean),
    default_preset: draft.default_preset,
    active: draft.active,
  };
}

function readIcon(file: File): Promise<string> {
  if (file.size > MAX_ICON_BYTES) return Promise.reject(new Error("The icon must be at most 64 KB."));
  if (!file.type.startsWith("image/")) return Promise.reject(new Error("The icon must be an image (SVG, PNG...)."));
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result));
    reader.onerror = () => reject(new Error("The icon could not be read."));
    reader.readAsDataURL(file);
  });
}

function ApplicationForm({ editing, onSaved }: { editing: Application | null; onSaved: () => void }) {
  const [draft, setDraft] = useState<Draft>(editing ? draftOf(editing) : EMPTY);
  const action = useAction();
  const set = (field: keyof Draft) => (e: ChangeEvent<HTMLInputElement | HTMLTextAreaElement | HTMLSelectElement>) =>
    setDraft({ ...draft, [field]: e.target.value });

  async function onIcon(e: ChangeEvent<HTMLInputElement>) {
    const file = e.target.files?.[0];
    if (file) await action.run(async () => setDraft({ ...draft, icon: await readIcon(file) }));
  }

  async function submit(event: FormEvent) {
    event.preventDefault();
    const ok = await action.run(() =>
      editing
        ? unwrap(api.PATCH("/api/v1/applications/{id_or_slug}", { params: { path: { id_or_slug: editing.id } }, body: bodyOf(draft) }))
        : unwrap(api.POST("/api/v1/applications", { body: bodyOf(draft) })),
    );
    if (ok) onSaved();
  }

  const field = (id: keyof Draft, label: string, props: Record<string, unknown> = {}) => (
    <Field id={`app-${id}`} label={label} value={String(draft[id])} onChange={set(id)} {...props} />
  );
  return (
    <form onSubmit={submit} className="grid-form">
      {field("name", "Name", { required: true, maxLength: 100, "data-autofocus": true })}
      {field("slug", "Slug (lower-case, dashes)", { required: true, pattern: "[a-z0-9][a-z0-9\\-]*" })}
      {field("image", "Container image", { required: true })}
      {field("port", "Port", { type: "number", min: 1, max: 65535, required: true })}
      <div className="wide">
        <label htmlFor="app-summary">Summary</label>
        <textarea id="app-summary" rows={2} value={draft.summary} onChange={set("summary")} />
      </div>
      <div className="wide">
        <label htmlFor="app-command">
          Command (one argument per line; {"{host}"}, {"{port}"}, {"{base_url}"}, {"{token}"} and {"{socket}"} are filled in)
        </label>
        <textarea id="app-command" rows={3} value={draft.command} onChange={set("command")} />
      </div>
      {field("working_dir", "Working directory")}
      {field("category", "Category")}
      {field("tags", "Tags (comma-separated)")}
      <div>
        <label htmlFor="app-preset">Default size</label>
        <select id="app-preset" value={draft.default_preset} onChange={set("default_preset")}>
          <option value="light">light</option>
          <option value="standard">standard</option>
          <option value="heavy">heavy</option>
        </select>
      </div>
      <div>
        <label htmlFor="app-icon">Icon (image, at most 64 KB)</label>
        <input id="app-icon" type="file" accept="image/*" onChange={onIcon} />
        {draft.icon ? <img src={draft.icon} alt="Icon preview" width={40} height={40} /> : null}
      </div>
      <label className="choice">
        <input type="checkbox" checked={draft.active} onChange={(e) => setDraft({ ...draft, active: e.target.checked })} /> Active
        (shown in the catalog)
      </label>
      <div className="wide">
        <ErrorMessage error={action.error} />
        <div className="actions">
          <button type="submit" className="primary" disabled={action.busy}>
            {editing ? "Save changes" : "Add application"}
          </button>
        </div>
      </div>
    </form>
  );
}

export default function AdminApplicationsPage() {
  const list = useLoad(() =>
    unwrap(api.GET("/api/v1/applications", { params: { query: { include_inactive: true } } })).then((a) => a.items),
  );
  const [editing, setEditing] = useState<Application | "new" | null>(null);
  const remove = useChange(list.reload);
  const deleting = useConfirm<Application>(remove, (app, close) =>
    remove.change(() => unwrap(api.DELETE("/api/v1/applications/{id_or_slug}", { params: { path: { id_or_slug: app.id } } })), close),
  );

  return (
    <>
      <h1>Application catalog</h1>
      <AdminNav />
      <button type="button" className="primary" onClick={() => setEditing("new")}>
        Add an application
      </button>
      <LoadState load={list} empty={list.data?.length === 0}>
        The catalog is empty.
      </LoadState>
      {list.data && list.data.length > 0 ? (
        <DataTable caption="Applications" columns={["Application", "Image", "State", "Actions"]}>
          {list.data.map((app) => (
            <tr key={app.id}>
              <th scope="row">
                <span className="app-head">
                  {app.icon ? <img src={app.icon} alt="" width={24} height={24} /> : null} {app.name}
                </span>
                <div className="muted small">{app.slug}</div>
              </th>
              <td>
                <code className="small">{app.image}</code>
              </td>
              <td>
                {app.active ? "active" : "inactive"}
                {app.available ? null : (
                  <p className="warning small" role="note" aria-label={`${app.name} is not installed`}>
                    {app.unavailable_reason}
                  </p>
                )}
              </td>
              <td className="row-actions">
                <button type="button" onClick={() => setEditing(app)} aria-label={`Edit ${app.name}`}>
                  Edit
                </button>
                <DangerButton label={`Delete ${app.name}`} onClick={() => deleting.ask(app)} />
              </td>
            </tr>
          ))}
        </DataTable>
      ) : null}
      <Dialog
        open={editing !== null}
        title={editing === "new" ? "Add an application" : "Edit application"}
        onClose={() => setEditing(null)}
      >
        <ApplicationForm
          key={editing === "new" ? "new" : editing?.id}
          editing={editing === "new" ? null : editing}
          onSaved={() => {
            setEditing(null);
            void list.reload();
          }}
        />
      </Dialog>
      <Confirm {...deleting.dialog} title="Delete application" confirmLabel="Delete">
        <p>Delete {deleting.target?.name} from the catalog? If environments use it, deactivate it instead.</p>
      </Confirm>
    </>
  );
}
