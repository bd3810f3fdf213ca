"use client";

import Link from "next/link";
import { useRouter, useSearchParams } from "next/navigation";
import { type ChangeEvent, type DragEvent, type FormEvent, Suspense, useCallback, useEffect, useRef, useState } from "react";
import { DownloadIcon, FileIcon, FolderIcon, UploadIcon } from "@/components/icons";
import {
  Confirm,
  DangerButton,
  DataTable,
  Dialog,
  ErrorMessage,
  Loading,
  LoadState,
  Name,
  Td,
  useAction,
  useChange,
  useConfirm,
  useLoad,
  useNow,
} from "@/components/ui";
import { api, objectUrl, type Preview, type Storage, type StorageObject, unwrap } from "@/lib/api";
import { formatBytes, formatDuration, formatSpeed, formatTime, plural } from "@/lib/format";
import { droppedFiles, type QueuedUpload, useUploadQueue } from "@/lib/uploads";

function folderHref(id: string, prefix: string): string {
  return `/storage/files/?id=${encodeURIComponent(id)}${prefix ? `&prefix=${encodeURIComponent(prefix)}` : ""}`;
}

/** The last segment of a key or folder ("maps/sky.fits" is "sky.fits", "maps/run1/" is "run1/"). */
function baseName(key: string): string {
  const folder = key.endsWith("/");
  const parts = key.split("/").filter(Boolean);
  return `${parts[parts.length - 1] ?? key}${folder ? "/" : ""}`;
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

/** Speed and time left of one upload, from what it sent since it started. */
function pace(item: QueuedUpload, now: number): string {
  if (item.status !== "uploading" || !item.startedAt) return "";
  const seconds = (now - item.startedAt) / 1000;
  if (seconds < 0.5 || item.loaded === 0) return "starting…";
  const speed = item.loaded / seconds;
  const left = (item.file.size - item.loaded) / speed;
  return `${formatSpeed(speed)}, ${formatDuration(left * 1000)} left`;
}

function UploadQueue({
  items,
  onCancel,
  onCancelAll,
  onClear,
}: {
  items: QueuedUpload[];
  onCancel: (id: number) => void;
  onCancelAll: () => void;
  onClear: () => void;
}) {
  const [now, setNow] = useState(() => performance.now());
  const active = items.some((item) => item.status === "uploading");
  useEffect(() => {
    if (!active) return;
    const timer = setInterval(() => setNow(performance.now()), 500);
    return () => clearInterval(timer);
  }, [active]);
  if (items.length === 0) return null;
  const done = items.filter((item) => item.status === "done").length;
  const total = items.reduce((sum, item) => sum + item.file.size, 0);
  const sent = items.reduce((sum, item) => sum + (item.status === "done" ? item.file.size : item.loaded), 0);
  const pending = items.some((item) => item.status === "uploading" || item.status === "queued");
  return (
    <section aria-label="Uploads" className="card">
      <div className="toolbar">
        <strong role="status" aria-live="polite">
          {done} of {plural(items.length, "file")} uploaded ({formatBytes(sent)} of {formatBytes(total)})
        </strong>
        {pending ? (
          <button type="button" onClick={onCancelAll}>
            Cancel all
          </button>
        ) : (
          <button type="button" onClick={onClear}>
            Clear the list
          </button>
        )}
      </div>
      <ul className="queue" aria-label="Upload queue">
        {items.map((item) => {
          const fraction = item.file.size ? (item.status === "done" ? 1 : item.loaded / item.file.size) : item.status === "done" ? 1 : 0;
          const state =
            item.status === "done"
              ? "uploaded"
              : item.status === "uploading"
                ? `${Math.round(fraction * 100)} %`
                : item.status === "queued"
                  ? "waiting"
                  : item.status === "cancelled"
                    ? "cancelled"
                    : `failed: ${item.error ?? ""}`;
          return (
            <li key={item.id} data-upload={item.path} data-state={item.status}>
              <label htmlFor={`up-${item.id}`} className="inline-name">
                <Name text={item.path} focusable={false} /> <span className="nowrap">{state}</span>
              </label>
              {item.status === "uploading" || item.status === "queued" ? (
                <button type="button" onClick={() => onCancel(item.id)} aria-label={`Cancel the upload of ${item.path}`}>
                  Cancel
                </button>
              ) : (
                <span className="muted small">{formatBytes(item.file.size)}</span>
              )}
              <progress id={`up-${item.id}`} max={1} value={fraction} className={item.status === "failed" ? "failed" : undefined} />
              {item.status === "uploading" ? <span className="muted small meter">{pace(item, now)}</span> : null}
            </li>
          );
        })}
      </ul>
    </section>
  );
}

/** What a file holds, without downloading it: text, JSON, CSV as a table, an image, FITS headers. */
function PreviewBody({ storageId, object }: { storageId: string; object: StorageObject }) {
  const preview = useLoad(() =>
    unwrap(
      api.GET("/api/v1/storages/{storage_id}/preview/{key}", {
        params: { path: { storage_id: storageId, key: object.key } },
      }),
    ),
  );
  if (preview.loading) return <Loading what="Reading the file" />;
  if (preview.error) return <ErrorMessage error={preview.error} />;
  const data = preview.data as Preview;
  const cut = data.truncated ? <p className="muted small">Only the beginning of the file is shown.</p> : null;
  switch (data.kind) {
    case "image":
      // eslint-disable-next-line @next/next/no-img-element
      return <img className="preview-image" src={objectUrl(storageId, object.key)} alt={`Preview of ${baseName(object.key)}`} />;
    case "fits":
      return (
        <div data-testid="fits-preview">
          {data.hdus?.map((hdu) => (
            <details key={hdu.index} open={hdu.index < 2}>
              <summary>
                HDU {hdu.index}: {hdu.name} ({plural(hdu.cards.length, "card")}
                {hdu.truncated ? ", cut" : ""})
              </summary>
              <div className="preview">
                <table className="fits-cards">
                  <caption className="visually-hidden">Header of HDU {hdu.index}</caption>
                  <thead>
                    <tr>
                      <th scope="col">Keyword</th>
                      <th scope="col">Value</th>
                      <th scope="col">Comment</th>
                    </tr>
                  </thead>
                  <tbody>
                    {hdu.cards.map((card, index) => (
                      <tr key={index}>
                        <th scope="row">{card.keyword}</th>
                        <td>{card.value}</td>
                        <td className="muted">{card.comment}</td>
                      </tr>
                    ))}
                  </tbody>
                </table>
              </div>
            </details>
          ))}
        </div>
      );
    case "json": {
      let shown = data.text ?? "";
      if (!data.truncated) {
        try {
          shown = JSON.stringify(JSON.parse(shown), null, 2);
        } catch {
          // not valid JSON after all: shown as it is
        }
      }
      return (
        <>
          <pre className="preview" tabIndex={0} data-testid="text-preview">
            {shown}
          </pre>
          {cut}
        </>
      );
    }
    case "csv": {
      const separator = object.key.toLowerCase().endsWith(".tsv") ? "\t" : ",";
      const rows = (data.text ?? "")
        .split(/\r?\n/)
        .filter((line) => line.length > 0)
        .slice(0, 200)
        .map((line) => line.split(separator));
      return (
        <>
          <div className="preview" tabIndex={0}>
            <table data-testid="csv-preview">
              <caption className="visually-hidden">The first rows of {baseName(object.key)}</caption>
              <tbody>
                {rows.map((cells, index) => (
                  <tr key={index}>
                    {cells.map((cell, column) =>
                      index === 0 ? (
                        <th key={column} scope="col">
                          {cell}
                        </th>
                      ) : (
                        <td key={column}>{cell}</td>
                      ),
                    )}
                  </tr>
                ))}
              </tbody>
            </table>
          </div>
          {cut}
        </>
      );
    }
    case "text":
      return (
        <>
          <pre className="preview" tabIndex={0} data-testid="text-preview">
            {data.text}
          </pre>
          {cut}
        </>
      );
    default:
      return <p className="muted">{data.message ?? "No preview for this kind of file."}</p>;
  }
}

interface Target {
  key: string;
  folder: boolean;
}

function MoveForm({
  storageId,
  target,
  onDone,
}: {
  storageId: string;
  target: Target;
  onDone: () => void;
}) {
  const action = useAction();
  const [destination, setDestination] = useState(target.folder ? target.key.replace(/\/$/, "") : target.key);
  async function submit(event: FormEvent) {
    event.preventDefault();
    const ok = await action.run(async () => {
      const cleaned = destination.trim().replace(/^\/+/, "").replace(/\/+$/, "");
      if (!cleaned) throw new Error("Give the new name.");
      await unwrap(
        api.POST("/api/v1/storages/{storage_id}/objects/move", {
          params: { path: { storage_id: storageId } },
          body: { source: target.key, destination: target.folder ? `${cleaned}/` : cleaned },
        }),
      );
    });
    if (ok) onDone();
  }
  return (
    <form onSubmit={submit}>
      <label htmlFor="move-to">New name (with folders: a/b/name moves it)</label>
      <input id="move-to" data-autofocus value={destination} onChange={(e) => setDestination(e.target.value)} />
      <p className="muted small">
        Buckets cannot rename: {target.folder ? "each file is" : "the file is"} copied to the new name, then the original
        deleted.
      </p>
      <ErrorMessage error={action.error} />
      <div className="actions">
        <button type="submit" className="primary" disabled={action.busy}>
          {action.busy ? "Moving…" : "Rename or move"}
        </button>
      </div>
    </form>
  );
}

function FileManager({ storageId, prefix }: { storageId: string; prefix: string }) {
  const [storage, setStorage] = useState<Storage | null>(null);
  const [objects, setObjects] = useState<StorageObject[]>([]);
  const [prefixes, setPrefixes] = useState<string[]>([]);
  const [nextToken, setNextToken] = useState<string | null>(null);
  const [loading, setLoading] = useState(true);
  const [error, setError] = useState<unknown>(null);
  const [folder, setFolder] = useState("");
  const [selected, setSelected] = useState<Set<string>>(new Set());
  const [previewing, setPreviewing] = useState<StorageObject | null>(null);
  const [moving, setMoving] = useState<Target | null>(null);
  const [over, setOver] = useState(false);
  const archive = useRef<HTMLFormElement>(null);
  const router = useRouter();
  useNow(60_000);

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
  const reload = useCallback(() => load(null), [load]);
  const action = useChange(reload);
  const uploads = useUploadQueue((path) => objectUrl(storageId, prefix + path), () => void reload());
  const deleting = useConfirm<Target[]>(action, (targets, close) =>
    action.change(
      () =>
        unwrap(
          api.POST("/api/v1/storages/{storage_id}/objects/delete", {
            params: { path: { storage_id: storageId } },
            body: {
              keys: targets.filter((t) => !t.folder).map((t) => t.key),
              prefixes: targets.filter((t) => t.folder).map((t) => t.key),
            },
          }),
        ),
      () => {
        setSelected(new Set());
        close();
      },
    ),
  );

  useEffect(() => {
    unwrap(api.GET("/api/v1/storages/{storage_id}", { params: { path: { storage_id: storageId } } })).then(setStorage, setError);
    void load(null);
  }, [storageId, load]);

  function onFiles(event: ChangeEvent<HTMLInputElement>) {
    const files = Array.from(event.target.files ?? []);
    event.target.value = "";
    // A folder chosen with "Upload a folder" keeps its path (webkitRelativePath: "run1/maps/sky.fits").
    uploads.add(files.map((file) => ({ file, path: file.webkitRelativePath || file.name })));
  }

  async function onDrop(event: DragEvent<HTMLElement>) {
    event.preventDefault();
    setOver(false);
    const files = await droppedFiles(event.dataTransfer);
    if (files.length) uploads.add(files);
  }

  function downloadSelected() {
    archive.current?.submit();
  }

  const crumbs = prefix.split("/").filter(Boolean);
  const base = (key: string) => key.slice(prefix.length);
  const rows: Target[] = [...prefixes.map((key) => ({ key, folder: true })), ...objects.map((o) => ({ key: o.key, folder: false }))];
  const chosen = rows.filter((row) => selected.has(row.key));
  const allSelected = rows.length > 0 && chosen.length === rows.length;
  const toggle = (key: string, on: boolean) => {
    const next = new Set(selected);
    if (on) next.add(key);
    else next.delete(key);
    setSelected(next);
  };
  const title = storage?.display_name ?? "Files";
  return (
    <div
      onDragOver={(event) => {
        if (Array.from(event.dataTransfer.types).includes("Files")) {
          event.preventDefault();
          setOver(true);
        }
      }}
      onDragLeave={(event) => {
        if (event.currentTarget === event.target) setOver(false);
      }}
      onDrop={onDrop}
      data-testid="file-manager"
    >
      <nav aria-label="Breadcrumb" className="crumbs">
        <ol>
          <li>
            <Link href="/storage/">Storage</Link>
          </li>
          <li>
            <Link href={folderHref(storageId, "")}>
              <Name text={storage?.display_name ?? "Bucket"} focusable={false} />
            </Link>
          </li>
          {crumbs.map((part, index) => (
            <li key={index}>
              <Link href={folderHref(storageId, `${crumbs.slice(0, index + 1).join("/")}/`)}>
                <Name text={part} focusable={false} />
              </Link>
            </li>
          ))}
        </ol>
      </nav>
      <h1>
        <Name text={prefix ? `${title}: ${prefix}` : title} />
      </h1>
      <div className="toolbar">
        <label className="button primary" htmlFor="upload">
          <UploadIcon /> Upload files
        </label>
        <input id="upload" className="visually-hidden" type="file" multiple onChange={onFiles} />
        <label className="button" htmlFor="upload-folder">
          <FolderIcon /> Upload a folder
        </label>
        <input
          id="upload-folder"
          className="visually-hidden"
          type="file"
          multiple
          onChange={onFiles}
          {...{ webkitdirectory: "", directory: "" }}
        />
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
      <p className={over ? "dropzone over" : "dropzone"} data-testid="dropzone">
        {over ? "Drop to upload here" : "Or drop files and folders anywhere on this page: folders keep their structure."}
      </p>
      <UploadQueue items={uploads.items} onCancel={uploads.cancel} onCancelAll={uploads.cancelAll} onClear={uploads.clear} />
      <LoadState
        load={{ error, loading }}
        actionError={action.error}
        what="Listing files"
        empty={!loading && !error && objects.length === 0 && prefixes.length === 0}
      >
        This folder is empty: upload files into it.
      </LoadState>
      {rows.length ? (
        <>
          <div className="toolbar" role="group" aria-label="Actions on the selected files">
            <span className="muted">{chosen.length} selected</span>
            <button type="button" disabled={!chosen.length} onClick={downloadSelected}>
              <DownloadIcon /> Download selected (zip)
            </button>
            <button type="button" className="danger" disabled={!chosen.length || action.busy} onClick={() => deleting.ask(chosen)}>
              Delete selected
            </button>
          </div>
          {/* A plain form: the browser streams the zip to disk as the server writes it. */}
          <form ref={archive} method="post" action={`/api/v1/storages/${encodeURIComponent(storageId)}/archive`} hidden>
            <input type="hidden" name="base" value={prefix} />
            {chosen.map((row) => (
              <input key={row.key} type="hidden" name={row.folder ? "prefix" : "key"} value={row.key} />
            ))}
          </form>
          <DataTable
            caption={`Files in ${prefix || "the bucket"}`}
            columns={[
              <input
                key="all"
                type="checkbox"
                aria-label="Select all files and folders"
                checked={allSelected}
                onChange={(e) => setSelected(new Set(e.target.checked ? rows.map((row) => row.key) : []))}
              />,
              "Name",
              "Size",
              "Modified",
              "Actions",
            ]}
          >
            {prefixes.map((p) => (
              <tr key={p} data-folder={base(p)}>
                <td className="col-check">
                  <input type="checkbox" aria-label={`Select ${base(p)}`} checked={selected.has(p)} onChange={(e) => toggle(p, e.target.checked)} />
                </td>
                <th scope="row" className="col-name">
                  <Link href={folderHref(storageId, p)} className="inline-name">
                    <FolderIcon /> <Name text={base(p)} focusable={false} />
                  </Link>
                </th>
                <Td label="Size" className="nowrap">folder</Td>
                <Td label="Modified" className="nowrap">—</Td>
                <td className="row-actions">
                  <button type="button" onClick={() => setMoving({ key: p, folder: true })} aria-label={`Rename or move ${base(p)}`}>
                    Rename
                  </button>
                  <DangerButton label={`Delete ${base(p)}`} onClick={() => deleting.ask([{ key: p, folder: true }])} />
                </td>
              </tr>
            ))}
            {objects.map((o) => (
              <tr key={o.key} data-file={base(o.key)}>
                <td className="col-check">
                  <input
                    type="checkbox"
                    aria-label={`Select ${base(o.key)}`}
                    checked={selected.has(o.key)}
                    onChange={(e) => toggle(o.key, e.target.checked)}
                  />
                </td>
                <th scope="row" className="col-name">
                  <span className="inline-name">
                    <FileIcon /> <Name text={base(o.key)} />
                  </span>
                </th>
                <Td label="Size" className="nowrap">{formatBytes(o.size)}</Td>
                <Td label="Modified" className="nowrap">{formatTime(o.last_modified)}</Td>
                <td className="row-actions">
                  <button type="button" onClick={() => setPreviewing(o)} aria-label={`Preview ${base(o.key)}`}>
                    Preview
                  </button>
                  <a className="button" href={objectUrl(storageId, o.key)} download={base(o.key)} aria-label={`Download ${base(o.key)}`}>
                    Download
                  </a>
                  <button type="button" onClick={() => setMoving({ key: o.key, folder: false })} aria-label={`Rename or move ${base(o.key)}`}>
                    Rename
                  </button>
                  <DangerButton label={`Delete ${base(o.key)}`} onClick={() => deleting.ask([{ key: o.key, folder: false }])} />
                </td>
              </tr>
            ))}
          </DataTable>
        </>
      ) : null}
      {nextToken ? (
        <button type="button" onClick={() => load(nextToken)}>
          Show more
        </button>
      ) : null}
      <Dialog open={previewing !== null} title="Preview" onClose={() => setPreviewing(null)}>
        {previewing ? (
          <>
            <p className="muted">
              <Name text={base(previewing.key)} /> {formatBytes(previewing.size)}
            </p>
            <PreviewBody storageId={storageId} object={previewing} />
            <div className="actions">
              <a className="button" href={objectUrl(storageId, previewing.key)} download={base(previewing.key)}>
                <DownloadIcon /> Download
              </a>
            </div>
          </>
        ) : null}
      </Dialog>
      <Dialog open={moving !== null} title="Rename or move" onClose={() => setMoving(null)}>
        {moving ? (
          <MoveForm
            key={moving.key}
            storageId={storageId}
            target={moving}
            onDone={() => {
              setMoving(null);
              setSelected(new Set());
              void reload();
            }}
          />
        ) : null}
      </Dialog>
      <Confirm {...deleting.dialog} title="Delete" confirmLabel="Delete">
        {deleting.target?.length === 1 ? (
          <p>
            Delete {deleting.target[0].folder ? "the folder" : ""} {baseName(deleting.target[0].key)}
            {deleting.target[0].folder ? " and every file in it" : ""}? This cannot be undone.
          </p>
        ) : (
          <p>
            Delete {plural(deleting.target?.length ?? 0, "selected item")}
            {deleting.target?.some((t) => t.folder) ? ", folders with every file in them" : ""}? This cannot be undone.
          </p>
        )}
      </Confirm>
    </div>
  );
}
