const UNITS = ["B", "KB", "MB", "GB", "TB", "PB"];

export function formatBytes(bytes: number | null | undefined): string {
  if (bytes === null || bytes === undefined) return "not measured yet";
  let value = bytes;
  let unit = 0;
  while (value >= 1000 && unit < UNITS.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return `${unit === 0 ? value : value.toFixed(value < 10 ? 1 : 0)} ${UNITS[unit]}`;
}

/** "2 h 5 min", "45 s": a duration for people. */
export function formatDuration(ms: number): string {
  const seconds = Math.max(0, Math.round(ms / 1000));
  const days = Math.floor(seconds / 86400);
  const hours = Math.floor((seconds % 86400) / 3600);
  const minutes = Math.floor((seconds % 3600) / 60);
  if (days) return `${days} d ${hours} h`;
  if (hours) return `${hours} h ${minutes} min`;
  if (minutes) return `${minutes} min`;
  return `${seconds} s`;
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
