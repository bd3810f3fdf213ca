"use client";

import { useEffect, useState } from "react";

export interface Progress {
  status: string;
  message: string;
  url: string | null;
  progress: number;
  /** The application's last output lines while it starts, and when it failed. */
  log: string[];
}

const TERMINAL = new Set(["running", "stopped", "failed", "deleted"]);

/** Follow an environment's progress stream (Server-Sent Events) until it settles. */
export function useProgress(environmentId: string | null): Progress | null {
  const [progress, setProgress] = useState<Progress | null>(null);
  useEffect(() => {
    setProgress(null);
    if (!environmentId) return;
    const source = new EventSource(`/api/v1/environments/${encodeURIComponent(environmentId)}/events`);
    const onEvent = (event: MessageEvent<string>) => {
      const data = JSON.parse(event.data) as Partial<Progress> & { status: string };
      setProgress({ progress: 100, message: "", url: null, log: [], ...data });
      // The server ends the stream here; closing first stops EventSource from reconnecting.
      if (TERMINAL.has(data.status)) source.close();
    };
    source.addEventListener("status", onEvent);
    source.addEventListener("deleted", onEvent);
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED) {
        setProgress(
          (last) => last ?? { status: "unknown", message: "the progress stream closed", url: null, progress: 0, log: [] },
        );
      }
    };
    return () => source.close();
  }, [environmentId]);
  return progress;
}
