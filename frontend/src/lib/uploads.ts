"use client";

import { useCallback, useEffect, useRef, useState } from "react";
import { message, uploadFile } from "@/lib/api";

/** One file waiting for, going through or done with its upload. */
export interface QueuedUpload {
  id: number;
  /** Its path under the folder it was dropped in: "run1/maps/sky.fits" for a dropped folder. */
  path: string;
  file: File;
  loaded: number;
  status: "queued" | "uploading" | "done" | "failed" | "cancelled";
  error?: string;
  startedAt?: number;
  finishedAt?: number;
}

/** Files uploaded at once: enough to hide each request's latency, few enough to share the line. */
const PARALLEL = 3;

let nextId = 1;

/**
 * The upload queue of a folder: every file chosen or dropped is listed at once, then uploaded a few
 * at a time, each with its own progress, speed and cancel. `urlOf(path)` says where a file goes;
 * `onSettled` runs when the queue empties (to list the folder again).
 */
export function useUploadQueue(urlOf: (path: string) => string, onSettled: () => void) {
  const [items, setItems] = useState<QueuedUpload[]>([]);
  const controllers = useRef(new Map<number, AbortController>());
  const urlRef = useRef(urlOf);
  urlRef.current = urlOf;
  const settledRef = useRef(onSettled);
  settledRef.current = onSettled;

  const update = useCallback((id: number, change: Partial<QueuedUpload>) => {
    setItems((old) => old.map((item) => (item.id === id ? { ...item, ...change } : item)));
  }, []);

  const add = useCallback((files: { file: File; path: string }[]) => {
    const added = files.map(({ file, path }) => ({ id: nextId++, path, file, loaded: 0, status: "queued" as const }));
    setItems((old) => [...old.filter((item) => item.status === "uploading" || item.status === "queued" || item.status === "failed"), ...added]);
  }, []);

  // Start queued files while fewer than PARALLEL run.
  useEffect(() => {
    const running = items.filter((item) => item.status === "uploading").length;
    const waiting = items.filter((item) => item.status === "queued").slice(0, Math.max(0, PARALLEL - running));
    for (const item of waiting) {
      const controller = new AbortController();
      controllers.current.set(item.id, controller);
      update(item.id, { status: "uploading", startedAt: performance.now() });
      uploadFile(urlRef.current(item.path), item.file, (loaded) => update(item.id, { loaded }), controller.signal).then(
        () => update(item.id, { status: "done", loaded: item.file.size, finishedAt: performance.now() }),
        (error: unknown) =>
          update(item.id, {
            status: controller.signal.aborted ? "cancelled" : "failed",
            error: controller.signal.aborted ? undefined : message(error),
            finishedAt: performance.now(),
          }),
      );
    }
  }, [items, update]);

  const busy = items.some((item) => item.status === "uploading" || item.status === "queued");
  const wasBusy = useRef(false);
  useEffect(() => {
    if (wasBusy.current && !busy) settledRef.current();
    wasBusy.current = busy;
  }, [busy]);

  const cancel = useCallback(
    (id: number) => {
      const controller = controllers.current.get(id);
      if (controller) controller.abort();
      setItems((old) => old.map((item) => (item.id === id && item.status === "queued" ? { ...item, status: "cancelled" } : item)));
    },
    [],
  );
  const cancelAll = useCallback(() => {
    controllers.current.forEach((controller) => controller.abort());
    setItems((old) => old.map((item) => (item.status === "queued" ? { ...item, status: "cancelled" } : item)));
  }, []);
  const clear = useCallback(() => {
    setItems((old) => old.filter((item) => item.status === "uploading" || item.status === "queued"));
  }, []);

  return { items, add, cancel, cancelAll, clear, busy };
}

/** Every file under the dropped items, with its path (folders walked, as a file manager does). */
export async function droppedFiles(transfer: DataTransfer): Promise<{ file: File; path: string }[]> {
  // Entries must be taken before the first await: the browser empties the list after the event.
  const entries = Array.from(transfer.items)
    .map((item) => (item.kind === "file" ? item.webkitGetAsEntry?.() : null))
    .filter((entry): entry is FileSystemEntry => Boolean(entry));
  if (entries.length === 0) return Array.from(transfer.files).map((file) => ({ file, path: file.name }));
  const found: { file: File; path: string }[] = [];
  for (const entry of entries) await walk(entry, "", found);
  return found;
}

async function walk(entry: FileSystemEntry, parent: string, into: { file: File; path: string }[]): Promise<void> {
  const path = parent + entry.name;
  if (entry.isFile) {
    const file = await new Promise<File>((resolve, reject) => (entry as FileSystemFileEntry).file(resolve, reject));
    into.push({ file, path });
    return;
  }
  if (entry.isDirectory) {
    const reader = (entry as FileSystemDirectoryEntry).createReader();
    // readEntries answers in batches (100 in Chromium) until it answers none.
    for (;;) {
      const batch = await new Promise<FileSystemEntry[]>((resolve, reject) => reader.readEntries(resolve, reject));
      if (batch.length === 0) break;
      for (const child of batch) await walk(child, `${path}/`, into);
    }
  }
}
