"use client";

import Link from "next/link";
import { useRouter, useSearchParams } from "next/navigation";
import { type ChangeEvent, Suspense, useCallback, useEffect, useState } from "react";
import { Confirm, DangerButton, DataTable, ErrorMessage, Loading, LoadState, useChange, useConfirm } from "@/components/ui";
import { api, objectUrl, type Storage, type StorageObject, unwrap, uploadFile } from "@/lib/api";
import { formatBytes, formatTime } from "@/lib/format";

interface Upload {
  name: string;
  fraction: number;
  done: boolean;
}

function folderHref(id: string, prefix: string): string {
  return `/storage/files/?id=${encodeURIComponent(id)}${prefix ? `&prefix=${encodeURIComponent(prefix)}` : ""}`;
}

// The bucket and folder come from the query string (?id=...&prefix=a/b/): every page is a static file.
export default function FilesPage() {
  return (
    <Suspense fallback={<Loading />}>
      <FilesFromQuery />
    </Suspense>
  );
}

function FilesFromQuery() {
  const params = useSearchParams();
  const id = params.get("id") ?? "";
  const prefix = params.get("prefix") ?? "";
  if (!id) return <ErrorMessage error={new Error("No bucket chosen: pick one on the Storage page.")} />;
  return <FileManager key={`${id}:${prefix}`} storageId={id} prefix={prefix} />;
}

function FileManager({ storageId, prefix }: { storageId: string; prefix: string }) {
  const [storage, setStorage] = useState<Storage | null>(null);
  const [objects, setObjects] = useState<StorageObject[]>([]);
  const [prefixes, setPrefixes] = useState<string[]>([]);
  const [nextToken, setNextToken] = useState<string | null>(null);
  const [loading, setLoading] = useState(true);
  const [error, setError] = useState<unknown>(null);
  const [uploads, setUploads] = useState<Upload[]>([]);
  const [folder, setFolder] = useState("");
  const router = useRouter();

  const load = useCallback(
    async (pageToken: string | null) => {
      try {
        const page = await unwrap(
          api.GET("/api/v1/storages/{storage_id}/objects", {
            params: { path: { storage_id: storageId }, query: { prefix, page_token: pageToken, delimiter: true, page_size: 200 } },
          }),
        );
        setObjects((old) => (pageToken ? [...old, ...page.objects] : page.objects));
        setPrefixes((old) => (pageToken ? [...old, ...page.prefixes] : page.prefixes));
        setNextToken(page.next_page_token);
        setError(null);
      } catch (err) {
        setError(err);
      } finally {
        setLoading(false);
      }
    },
    [storageId, prefix],
  );
  const action = useChange(() => load(null));
  const deleting = useConfirm<StorageObject>(action, (object, close) =>
    action.change(
      () =>
        unwrap(
          api.DELETE("/api/v1/storages/{storage_id}/objects/{key}", {
            params: { path: { storage_id: storageId, key: object.key } },
          }),
        ),
      close,
    ),
  );

  useEffect(() => {
    unwrap(api.GET("/api/v1/storages/{storage_id}", { params: { path: { storage_id: storageId } } })).then(setStorage, setError);
    void load(null);
  }, [storageId, load]);

  async function onFiles(event: ChangeEvent<HTMLInputElement>) {
    const files = Array.from(event.target.files ?? []);
    event.target.value = "";
    await action.change(async () => {
      for (const file of files) {
        setUploads((old) => [...old.filter((u) => u.name !== file.name), { name: file.name, fraction: 0, done: false }]);
        const update = (fraction: number, done = false) =>
          setUploads((old) => old.map((u) => (u.name === file.name ? { ...u, fraction, done } : u)));
        await uploadFile(objectUrl(storageId, prefix + file.name), file, (f) => update(f));
        update(1, true);
      }
    });
  }

  const crumbs = prefix.split("/").filter(Boolean);
  const base = (key: string) => key.slice(prefix.length);
  return (
    <>
      <nav aria-label="Breadcrumb" className="crumbs">
        <ol>
          <li>
            <Link href="/storage/">Storage</Link>
          </li>
          <li>
            <Link href={folderHref(storageId, "")}>{storage?.display_name ?? "Bucket"}</Link>
          </li>
          {crumbs.map((part, index) => (
            <li key={index}>
              <Link href={folderHref(storageId, `${crumbs.slice(0, index + 1).join("/")}/`)}>{part}</Link>
            </li>
          ))}
        </ol>
      </nav>
      <h1>{storage?.display_name ?? "Files"}</h1>
      <div className="toolbar">
        <label className="button primary" htmlFor="upload">
          Upload files
        </label>
        <input id="upload" className="visually-hidden" type="file" multiple onChange={onFiles} disabled={action.busy} />
        <form
          className="inline-form"
          onSubmit={(event) => {
            event.preventDefault();
            const name = folder.trim().replace(/^\/+|\/+$/g, "");
            if (name) router.push(folderHref(storageId, `${prefix}${name}/`));
          }}
        >
          <label htmlFor="folder">Open or make a folder</label>
          <input id="folder" value={folder} onChange={(e) => setFolder(e.target.value)} placeholder="results" />
          <button type="submit">Go</button>
        </form>
      </div>
      {uploads.length ? (
        <ul className="plain uploads" aria-label="Uploads">
          {uploads.map((u) => (
            <li key={u.name}>
              <label htmlFor={`up-${u.name}`}>
                {u.name} {u.done ? "uploaded" : `${Math.round(u.fraction * 100)} %`}
              </label>
              <progress id={`up-${u.name}`} max={1} value={u.fraction} />
            </li>
          ))}
        </ul>
      ) : null}
      <LoadState
        load={{ error, loading }}
        actionError={action.error}
        what="Listing files"
        empty={!loading && !error && objects.length === 0 && prefixes.length === 0}
      >
        This folder is empty: upload files into it.
      </LoadState>
      {objects.length || prefixes.length ? (
        <DataTable caption={`Files in ${prefix || "the bucket"}`} columns={["Name", "Size", "Modified", "Actions"]}>
          {prefixes.map((p) => (
            <tr key={p}>
              <th scope="row" colSpan={4}>
                <Link href={folderHref(storageId, p)}>📁 {base(p)}</Link>
              </th>
            </tr>
          ))}
          {objects.map((o) => (
            <tr key={o.key}>
              <th scope="row">{base(o.key)}</th>
              <td>{formatBytes(o.size)}</td>
              <td>{formatTime(o.last_modified)}</td>
              <td className="row-actions">
                <a className="button" href={objectUrl(storageId, o.key)} download={base(o.key)} aria-label={`Download ${base(o.key)}`}>
                  Download
                </a>
                <DangerButton label={`Delete ${base(o.key)}`} onClick={() => deleting.ask(o)} />
              </td>
            </tr>
          ))}
        </DataTable>
      ) : null}
      {nextToken ? (
        <button type="button" onClick={() => load(nextToken)}>
          Show more
        </button>
      ) : null}
      <Confirm {...deleting.dialog} title="Delete file" confirmLabel="Delete file">
        <p>Delete {deleting.target ? base(deleting.target.key) : ""}? This cannot be undone.</p>
      </Confirm>
    </>
  );
}
