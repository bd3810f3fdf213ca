// The typed API client: openapi-fetch over the types generated from the control plane's OpenAPI
// document (src/api/schema.d.ts; `./run nox -s openapi-client` regenerates it). The browser
// authenticates with the HttpOnly session cookie the sign-in sets; nothing here sees a token.
import createClient from "openapi-fetch";
import type { components, paths } from "@/api/schema";

export type Schemas = components["schemas"];
export type User = Schemas["UserOut"];
export type Environment = Schemas["EnvironmentOut"];
export type Application = Schemas["ApplicationOut"];
export type Preset = Schemas["PresetOut"];
export type Storage = Schemas["StorageOut"];
export type StorageObject = Schemas["ObjectOut"];
export type AdminUser = Schemas["AdminUserOut"];
export type AuditEvent = Schemas["AuditEventOut"];
export type Provider = Schemas["ProviderOut"];
export type Limits = Schemas["LimitsOut"];
export type Preview = Schemas["PreviewOut"];

export const api = createClient<paths>({ baseUrl: "", credentials: "same-origin" });

/** An answer the API refused, with the message the API wrote for a person. */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly code: string = "error",
  ) {
    super(message);
    this.name = "ApiError";
  }
}

interface Answer<T> {
  data?: T;
  error?: unknown;
  response: Response;
}

/** What the UI calls the fields the API may name in a refusal of a form's values. */
const FIELD_LABELS: Record<string, string> = {
  display_name: "Name",
  name: "Name",
  storage_class: "Storage class",
  mount_path: "Mount path",
  storage_id: "Bucket",
  preset: "Size",
  cpu: "CPU",
  memory_mib: "Memory",
  env: "Variables",
  value: "Value",
  expires_in_days: "Expiry",
  max_uptime_minutes: "Maximum uptime",
  slug: "Slug",
  image: "Container image",
  port: "Port",
  command: "Command",
  summary: "Summary",
  source: "Name",
  destination: "New name",
};

interface FieldProblem {
  loc?: unknown[];
  msg?: string;
}

/** A 422's per-field problems in the form's words: "Name: should have at least 1 character". */
function describeFields(detail: unknown): string | null {
  if (!Array.isArray(detail) || detail.length === 0) return null;
  const lines = (detail as FieldProblem[]).map((problem) => {
    const names = (problem.loc ?? []).filter((part): part is string => typeof part === "string" && part !== "body");
    const field = names.reverse().find((part) => part in FIELD_LABELS);
    const what = (problem.msg ?? "is not accepted").replace(/^(String|Value|Input|List) /, "").replace(/^Value error, /, "");
    const text = what.charAt(0).toLowerCase() + what.slice(1);
    return field ? `${FIELD_LABELS[field]}: ${text}` : `One of the values: ${text}`;
  });
  return `${Array.from(new Set(lines)).join("; ")}.`;
}

/** The error body's message ({error, message}), or a plain description of the status. */
export function errorFrom(status: number, body: unknown): ApiError {
  if (status === 422 && body && typeof body === "object" && "detail" in body) {
    const described = describeFields(body.detail);
    if (described) return new ApiError(status, described, "invalid_request");
  }
  if (body && typeof body === "object" && "message" in body && typeof body.message === "string") {
    const code = "error" in body && typeof body.error === "string" ? body.error : "error";
    return new ApiError(status, body.message, code);
  }
  if (status === 401) return new ApiError(status, "Your session has ended: sign in again.", "unauthenticated");
  if (status >= 500) return new ApiError(status, "The server failed to answer; try again in a moment.");
  return new ApiError(status, `The request was refused (HTTP ${status}).`);
}

/** The data of a successful answer; an ApiError otherwise (a 401 also sends the browser to sign in). */
export async function unwrap<T>(request: Promise<Answer<T>>): Promise<T> {
  let answer: Answer<T>;
  try {
    answer = await request;
  } catch {
    throw new ApiError(0, "The server cannot be reached; check your connection and try again.", "network");
  }
  if (answer.response.ok) return answer.data as T;
  if (answer.response.status === 401) redirectToSignIn();
  throw errorFrom(answer.response.status, answer.error);
}

/** To the sign-in page, which brings the browser back here; `signedOut`: it says the session ended. */
export function redirectToSignIn({ signedOut = false }: { signedOut?: boolean } = {}): void {
  if (typeof window === "undefined" || window.location.pathname.startsWith("/signin")) return;
  const next = window.location.pathname + window.location.search;
  window.location.assign(`/signin/?${signedOut ? "signed_out=1&" : ""}next=${encodeURIComponent(next)}`);
}

/** The URL path of an object: each key segment escaped, the slashes kept. */
export function objectUrl(storageId: string, key: string): string {
  const path = key.split("/").map(encodeURIComponent).join("/");
  return `/api/v1/storages/${encodeURIComponent(storageId)}/objects/${path}`;
}

/**
 * Upload a file as the raw request body (the browser streams it from disk), reporting progress.
 * XMLHttpRequest, not fetch: only it reports upload progress.
 */
export function uploadFile(
  url: string,
  file: Blob,
  onProgress: (loaded: number, total: number) => void,
  signal?: AbortSignal,
): Promise<void> {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("PUT", url);
    xhr.setRequestHeader("Content-Type", file.type || "application/octet-stream");
    xhr.upload.onprogress = (event) => {
      if (event.lengthComputable) onProgress(event.loaded, event.total);
    };
    xhr.onload = () => {
      if (xhr.status >= 200 && xhr.status < 300) return resolve();
      let body: unknown = null;
      try {
        body = JSON.parse(xhr.responseText);
      } catch {
        body = null;
      }
      if (xhr.status === 401) redirectToSignIn();
      reject(errorFrom(xhr.status, body));
    };
    xhr.onerror = () => reject(new ApiError(0, "The upload was interrupted: the server cannot be reached.", "network"));
    xhr.onabort = () => reject(new ApiError(0, "The upload was cancelled.", "aborted"));
    if (signal?.aborted) return reject(new ApiError(0, "The upload was cancelled.", "aborted"));
    signal?.addEventListener("abort", () => xhr.abort());
    xhr.send(file);
  });
}

export function message(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}
