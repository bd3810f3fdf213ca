"use client";

import { useEffect, useState } from "react";
import { redirectToSignIn } from "@/lib/api";

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
    // The session ended while the dialog was open (signed out in another tab, or by an administrator):
    // the server ends the stream; the browser goes to sign in, and comes back here afterwards.
    source.addEventListener("signed_out", () => {
      source.close();
      redirectToSignIn({ signedOut: true });
    });
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
