// Sizes in binary units (KiB, MiB, GiB), as memory is configured and as the operating system counts:
// 2048 MiB is "2 GiB", not "2.1 GB".
const UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];

export function formatBytes(bytes: number | null | undefined): string {
  if (bytes === null || bytes === undefined) return "not measured yet";
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < UNITS.length - 1) {
    value /= 1024;
    unit += 1;
  }
  if (unit === 0) return `${value} B`;
  const digits = value < 10 && !Number.isInteger(value) ? 1 : 0;
  return `${Number(value.toFixed(digits))} ${UNITS[unit]}`;
}

/** Memory given in MiB (as presets and environments are): "2 GiB", "512 MiB". */
export function formatMemory(mib: number): string {
  return formatBytes(mib * 1024 * 1024);
}

/**
 * How full a storage quota is: "over" once used reaches it (uploads are refused), "near" from 80 %
 * (as budgets warn), else "ok" (also when there is no quota).
 */
export function quotaState(used: number, quota: number | null | undefined): "ok" | "near" | "over" {
  if (quota === null || quota === undefined || quota <= 0) return "ok";
  if (used >= quota) return "over";
  return used >= 0.8 * quota ? "near" : "ok";
}

/** The box a quota's line is shown in: red once it is used up, yellow near it, none below. */
export const QUOTA_CLASS = { ok: "", near: "warning", over: "error" } as const;

/** "1 bucket", "3 buckets", "0 files". */
export function plural(count: number, singular: string, pluralForm = `${singular}s`): string {
  return `${count} ${count === 1 ? singular : pluralForm}`;
}

/** "2 h 5 min", "45 s": a duration for people. */
export function formatDuration(ms: number): string {
  const seconds = Math.max(0, Math.round(ms / 1000));
  const days = Math.floor(seconds / 86400);
  const hours = Math.floor((seconds % 86400) / 3600);
  const minutes = Math.floor((seconds % 3600) / 60);
  if (days) return hours ? `${days} d ${hours} h` : `${days} d`;
  if (hours) return `${hours} h ${minutes} min`;
  if (minutes) return `${minutes} min`;
  return `${seconds} s`;
}

/** Minutes as a duration ("24 h", "90 min"); 0 is "never". */
export function formatMinutes(minutes: number): string {
  if (!minutes) return "never";
  // Limits are set in whole hours more often than not, and read best so: "24 h", not "1 d".
  if (minutes % 60 === 0) return `${minutes / 60} h`;
  return formatDuration(minutes * 60_000).replace(/ 0 min$/, "");
}

/** Milliseconds since the epoch; a time without a zone is UTC (as the API's are). */
export function parseTime(iso: string): number {
  return new Date(/[zZ]|[+-]\d\d:?\d\d$/.test(iso) ? iso : `${iso}Z`).getTime();
}

export function formatTime(iso: string | null | undefined): string {
  if (!iso) return "—";
  return new Date(parseTime(iso)).toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

export function since(iso: string | null | undefined, now: number): string {
  if (!iso) return "—";
  return `${formatDuration(now - parseTime(iso))} ago`;
}

/** Transfer speed: "12.3 MiB/s". */
export function formatSpeed(bytesPerSecond: number): string {
  return `${formatBytes(Math.round(bytesPerSecond))}/s`;
}

/**
 * An environment's status message after its status word, without saying the word twice: the server's
 * reasons may begin with it ("stopped: it reached its maximum uptime" after "stopped").
 */
export function reason(status: string, message: string | null | undefined): string {
  if (!message) return "";
  const text = message.trim();
  const repeated = new RegExp(`^${status}\\b[:,]?\\s*`, "i");
  return text.replace(repeated, "");
}

/** "stopped by its owner", "stopped: it reached its maximum uptime": a stop and its reason in one phrase. */
export function stoppedBecause(text: string): string {
  const why = reason("stopped", text);
  if (!why) return "stopped";
  return /^(by|after|with|while|because|for|when)\b/i.test(why) ? `stopped ${why}` : `stopped: ${why}`;
}
