"use client";

import Link from "next/link";
import { useState } from "react";
import {
  Card,
  Confirm,
  DangerButton,
  DataTable,
  Field,
  InlineForm,
  LoadState,
  Name,
  Td,
  useAction,
  useConfirm,
  useLoad,
} from "@/components/ui";
import { api, type Schemas, type Storage, unwrap } from "@/lib/api";
import { QUOTA_CLASS, formatBytes, formatTime, plural, quotaState } from "@/lib/format";

type StorageClass = Schemas["StorageClass"];
const CLASSES: { value: StorageClass; label: string }[] = [
  { value: "standard", label: "Standard: files you use often" },
  { value: "infrequent", label: "Infrequent: read about once a month" },
  { value: "cold", label: "Cold: read a few times a year" },
  { value: "archive", label: "Archive: kept, rarely read" },
  { value: "auto", label: "Automatic: the cloud moves files by use" },
];

export default function StoragePage() {
  const answer = useLoad(() => unwrap(api.GET("/api/v1/storages")));
  const list = { ...answer, data: answer.data?.storages };
  const quota = answer.data?.quota;
  const create = useAction();
  const remove = useAction();
  const [name, setName] = useState("");
  const [storageClass, setStorageClass] = useState<StorageClass>("standard");
  const [force, setForce] = useState(false);
  const deleting = useConfirm<Storage>(remove, async (storage, close) => {
    const ok = await remove.run(() =>
      unwrap(
        api.DELETE("/api/v1/storages/{storage_id}", {
          params: { path: { storage_id: storage.id }, query: { force } },
        }),
      ),
    );
    if (ok) {
      close();
      await answer.reload();
    }
  });

  async function submit() {
    const ok = await create.run(async () => {
      const wanted = name.trim();
      if (!wanted) throw new Error("Give the bucket a name.");
      return unwrap(api.POST("/api/v1/storages", { body: { display_name: wanted, storage_class: storageClass } }));
    });
    if (ok) {
      setName("");
      await answer.reload();
    }
  }

  return (
    <>
      <h1>Storage</h1>
      <Card id="new-bucket" title="New bucket">
        <InlineForm onSubmit={submit} submitLabel="Create bucket" primary busy={create.busy} error={create.error}>
          <Field id="bucket-name" label="Name" required maxLength={100} value={name} onChange={(e) => setName(e.target.value)} />
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
        </InlineForm>
      </Card>
      {quota ? (
        <p id="storage-quota" className={QUOTA_CLASS[quotaState(quota.used_bytes, quota.quota_bytes)]}>
          {formatBytes(quota.used_bytes)} stored
          {quota.noncurrent_bytes > 0 ? ` (${formatBytes(quota.noncurrent_bytes)} in earlier versions, billed until they expire)` : ""}
          {quota.quota_bytes != null ? ` of your ${formatBytes(quota.quota_bytes)} quota` : ""}
          {quotaState(quota.used_bytes, quota.quota_bytes) === "over" ? ": it is used up, so uploads are refused until you delete files" : ""}.
        </p>
      ) : null}
      {answer.data?.group_quotas.map((group) => {
        const full = quotaState(group.used_bytes, group.quota_bytes);
        return (
          <p key={group.group} className={`group-quota ${QUOTA_CLASS[full]}`}>
            Group <Name text={group.group} focusable={false} />: {formatBytes(group.used_bytes)} stored by its members
            {group.noncurrent_bytes > 0 ? ` (${formatBytes(group.noncurrent_bytes)} in earlier versions)` : ""} of the
            group&apos;s {formatBytes(group.quota_bytes)} quota
            {full === "over"
              ? ": over its quota, so uploads are refused until its members delete files or an administrator raises it"
              : ""}
            .
          </p>
        );
      })}
      <LoadState load={list} what="Loading your buckets" empty={list.data?.length === 0}>
        No bucket yet: create one above.
      </LoadState>
      {list.data && list.data.length > 0 ? (
        <DataTable caption="Your buckets" columns={["Name", "Class", "Usage", "Created", "Actions"]}>
          {list.data.map((s) => (
            <tr key={s.id}>
              <th scope="row">
                <Link href={`/storage/files/?id=${encodeURIComponent(s.id)}`}>
                  <Name text={s.display_name} focusable={false} />
                </Link>
                <div className="muted small">
                  <Name
                    text={`${s.backend}: ${s.bucket_name}${
                      s.status === "deleting" ? " (being deleted)" : s.status !== "active" ? ` (${s.status})` : ""
                    }`}
                  />
                </div>
                {s.moving_to ? (
                  <div className="small">
                    <span className="badge badge-pending" title="Usable meanwhile: files changed now are copied too">
                      being moved to {s.moving_to}
                    </span>
                  </div>
                ) : null}
              </th>
              <Td label="Class">{s.storage_class}</Td>
              <Td label="Usage">
                {formatBytes(s.size_bytes)}
                {s.object_count !== null ? <span className="muted"> · {plural(s.object_count, "file")}</span> : null}
                {s.noncurrent_bytes ? (
                  <div className="muted small">
                    + {formatBytes(s.noncurrent_bytes)} in {plural(s.noncurrent_object_count ?? 0, "earlier version")}
                  </div>
                ) : null}
              </Td>
              <Td label="Created">{formatTime(s.created_at)}</Td>
              <td className="row-actions">
                <Link className="button" href={`/storage/files/?id=${encodeURIComponent(s.id)}`}>
                  Browse
                </Link>
                <DangerButton
                  label={`Delete ${s.display_name}`}
                  onClick={() => {
                    setForce(false);
                    remove.setError(null);
                    deleting.ask(s);
                  }}
                />
              </td>
            </tr>
          ))}
        </DataTable>
      ) : null}
      <Confirm {...deleting.dialog} title="Delete bucket" confirmLabel="Delete bucket">
        <p>Delete the bucket {deleting.target?.display_name}? This cannot be undone.</p>
        {deleting.target?.object_count ? (
          <p>It holds {plural(deleting.target.object_count, "file")} ({formatBytes(deleting.target.size_bytes)}).</p>
        ) : null}
        <label className="choice">
          <input type="checkbox" checked={force} onChange={(e) => setForce(e.target.checked)} /> Also delete every file in it
        </label>
      </Confirm>
    </>
  );
}
