"use client";

import Link from "next/link";
import { type FormEvent, useState } from "react";
import { Confirm, Empty, ErrorMessage, Loading, useAction, useLoad } from "@/components/ui";
import { api, type Schemas, type Storage, unwrap } from "@/lib/api";
import { formatBytes, formatTime } from "@/lib/format";

type StorageClass = Schemas["StorageClass"];
const CLASSES: { value: StorageClass; label: string }[] = [
  { value: "standard", label: "Standard: files you use often" },
  { value: "infrequent", label: "Infrequent: read about once a month" },
  { value: "cold", label: "Cold: read a few times a year" },
  { value: "archive", label: "Archive: kept, rarely read" },
  { value: "auto", label: "Automatic: the cloud moves files by use" },
];

export default function StoragePage() {
  const list = useLoad(() => unwrap(api.GET("/api/v1/storages")).then((a) => a.storages));
  const create = useAction();
  const remove = useAction();
  const [name, setName] = useState("");
  const [storageClass, setStorageClass] = useState<StorageClass>("standard");
  const [deleting, setDeleting] = useState<Storage | null>(null);
  const [force, setForce] = useState(false);

  async function submit(event: FormEvent) {
    event.preventDefault();
    const ok = await create.run(() =>
      unwrap(api.POST("/api/v1/storages", { body: { display_name: name, storage_class: storageClass } })),
    );
    if (ok) {
      setName("");
      await list.reload();
    }
  }

  async function confirmDelete() {
    if (!deleting) return;
    const ok = await remove.run(() =>
      unwrap(
        api.DELETE("/api/v1/storages/{storage_id}", {
          params: { path: { storage_id: deleting.id }, query: { force } },
        }),
      ),
    );
    if (ok) {
      setDeleting(null);
      await list.reload();
    }
  }

  return (
    <>
      <h1>Storage</h1>
      <section aria-labelledby="new-bucket" className="card">
        <h2 id="new-bucket">New bucket</h2>
        <form className="inline-form" onSubmit={submit}>
          <div>
            <label htmlFor="bucket-name">Name</label>
            <input id="bucket-name" required maxLength={100} value={name} onChange={(e) => setName(e.target.value)} />
          </div>
          <div>
            <label htmlFor="bucket-class">Storage class</label>
            <select id="bucket-class" value={storageClass} onChange={(e) => setStorageClass(e.target.value as StorageClass)}>
              {CLASSES.map((c) => (
                <option key={c.value} value={c.value}>
                  {c.label}
                </option>
              ))}
            </select>
          </div>
          <button type="submit" className="primary" disabled={create.busy}>
            Create bucket
          </button>
        </form>
        <ErrorMessage error={create.error} />
      </section>
      <ErrorMessage error={list.error} />
      {list.loading ? <Loading what="Loading your buckets" /> : null}
      {list.data?.length === 0 ? <Empty>No bucket yet: create one above.</Empty> : null}
      {list.data && list.data.length > 0 ? (
        <div className="table-wrap">
          <table>
            <caption className="visually-hidden">Your buckets</caption>
            <thead>
              <tr>
                <th scope="col">Name</th>
                <th scope="col">Class</th>
                <th scope="col">Usage</th>
                <th scope="col">Created</th>
                <th scope="col">Actions</th>
              </tr>
            </thead>
            <tbody>
              {list.data.map((s) => (
                <tr key={s.id}>
                  <th scope="row">
                    <Link href={`/storage/files/?id=${encodeURIComponent(s.id)}`}>{s.display_name}</Link>
                    <div className="muted small">
                      {s.backend}: {s.bucket_name}
                      {s.status !== "active" ? ` (${s.status})` : ""}
                    </div>
                  </th>
                  <td>{s.storage_class}</td>
                  <td>
                    {formatBytes(s.size_bytes)}
                    {s.object_count !== null ? <span className="muted"> · {s.object_count} files</span> : null}
                  </td>
                  <td>{formatTime(s.created_at)}</td>
                  <td className="row-actions">
                    <Link className="button" href={`/storage/files/?id=${encodeURIComponent(s.id)}`}>
                      Browse
                    </Link>
                    <button
                      type="button"
                      className="danger"
                      aria-label={`Delete ${s.display_name}`}
                      onClick={() => {
                        setForce(false);
                        remove.setError(null);
                        setDeleting(s);
                      }}
                    >
                      Delete
                    </button>
                  </td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      ) : null}
      <Confirm
        open={deleting !== null}
        title="Delete bucket"
        confirmLabel="Delete bucket"
        busy={remove.busy}
        error={remove.error}
        onClose={() => setDeleting(null)}
        onConfirm={confirmDelete}
      >
        <p>Delete the bucket {deleting?.display_name}? This cannot be undone.</p>
        <label className="choice">
          <input type="checkbox" checked={force} onChange={(e) => setForce(e.target.checked)} /> Also delete every file in it
        </label>
      </Confirm>
    </>
  );
}
