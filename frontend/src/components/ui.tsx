"use client";

import { type FormEvent, type InputHTMLAttributes, type ReactNode, useCallback, useEffect, useRef, useState } from "react";
import { message } from "@/lib/api";

/** A failed request's message, announced to screen readers. */
export function ErrorMessage({ error }: { error: unknown }) {
  if (!error) return null;
  return (
    <p className="error" role="alert">
      {message(error)}
    </p>
  );
}

export function Loading({ what = "Loading" }: { what?: string }) {
  return (
    <p className="muted" role="status" aria-live="polite">
      <span className="spinner" aria-hidden="true" /> {what}…
    </p>
  );
}

export function Empty({ children }: { children: ReactNode }) {
  return <div className="empty">{children}</div>;
}

/**
 * A read's state above its content, in this order: its error, an action's error (if given), the
 * spinner while loading, and `children` as the empty state when `empty`.
 */
export function LoadState({
  load,
  actionError,
  what,
  empty,
  children,
}: {
  load: { error: unknown; loading: boolean };
  actionError?: unknown;
  what?: string;
  empty: boolean | undefined;
  children: ReactNode;
}) {
  return (
    <>
      <ErrorMessage error={load.error} />
      <ErrorMessage error={actionError} />
      {load.loading ? <Loading what={what} /> : null}
      {empty ? <Empty>{children}</Empty> : null}
    </>
  );
}

/** The id of the {@link LengthHint} of the input `id`, for the input's `aria-describedby`. */
export const lengthHintId = (id: string) => `${id}-length`;

/**
 * Inside an input's label: the most characters it takes. The browser cuts a longer paste at
 * `maxLength` without a word, so the limit is said beforehand. Hidden from the label's text (the
 * field's name stays "Name"); the input reads it as its description: `aria-describedby={lengthHintId(id)}`.
 */
export function LengthHint({ id, max }: { id: string; max: number }) {
  return (
    <span id={lengthHintId(id)} className="muted small" aria-hidden="true">
      {` (up to ${max} characters)`}
    </span>
  );
}

/** An input with its visible label above it, and its length limit in the label where it has one. */
export function Field({ id, label, ...input }: { id: string; label: ReactNode } & InputHTMLAttributes<HTMLInputElement>) {
  const limited = input.maxLength !== undefined;
  return (
    <div>
      <label htmlFor={id}>
        {label}
        {limited ? <LengthHint id={id} max={input.maxLength as number} /> : null}
      </label>
      <input id={id} aria-describedby={limited ? lengthHintId(id) : undefined} {...input} />
    </div>
  );
}

/**
 * A one-line form: its fields, a submit button (disabled while `busy` or `disabled`), and below the
 * form the error of its last submission. The default action of the submit event is prevented.
 */
export function InlineForm({
  onSubmit,
  submitLabel,
  busy,
  disabled,
  primary,
  error,
  children,
}: {
  onSubmit: () => void;
  submitLabel: string;
  busy: boolean;
  disabled?: boolean;
  primary?: boolean;
  error: unknown;
  children: ReactNode;
}) {
  return (
    <>
      <form
        className="inline-form"
        onSubmit={(event: FormEvent) => {
          event.preventDefault();
          onSubmit();
        }}
      >
        {children}
        <button type="submit" className={primary ? "primary" : undefined} disabled={busy || disabled}>
          {submitLabel}
        </button>
      </form>
      <ErrorMessage error={error} />
    </>
  );
}

/** A titled card: a section named by its heading. */
export function Card({ id, title, children }: { id: string; title: string; children: ReactNode }) {
  return (
    <section className="card" aria-labelledby={id}>
      <h2 id={id}>{title}</h2>
      {children}
    </section>
  );
}

/**
 * A name that may be long (a file, a bucket, a person): one line cut with "…", the whole name on
 * hover (its tooltip) and on focus (it unfolds), and always whole for screen readers.
 * `focusable`: false when it sits in a link or button, which takes the focus itself.
 */
export function Name({ text, focusable = true, className }: { text: string; focusable?: boolean; className?: string }) {
  return (
    <span className={className ? `name ${className}` : "name"} title={text} tabIndex={focusable ? 0 : undefined}>
      {text}
    </span>
  );
}

/** A table cell that says its column when the table becomes cards on a narrow screen. */
export function Td({ label, className, children }: { label: string; className?: string; children: ReactNode }) {
  return (
    <td data-label={label} className={className}>
      {children}
    </td>
  );
}

/**
 * A table with a caption for screen readers and one header cell per column; `children` are its rows.
 * On a narrow screen each row becomes a card (cells made with <Td> say their column).
 */
export function DataTable({ caption, columns, children }: { caption: ReactNode; columns: ReactNode[]; children: ReactNode }) {
  return (
    <div className="table-wrap">
      <table className="responsive">
        <caption className="visually-hidden">{caption}</caption>
        <thead>
          <tr>
            {columns.map((column, index) => (
              <th key={index} scope="col">
                {column}
              </th>
            ))}
          </tr>
        </thead>
        <tbody>{children}</tbody>
      </table>
    </div>
  );
}

/** A destructive button whose accessible name (`label`) says what it acts on; it reads "Delete" unless told. */
export function DangerButton({
  label,
  onClick,
  disabled,
  children = "Delete",
}: {
  label: string;
  onClick: () => void;
  disabled?: boolean;
  children?: ReactNode;
}) {
  return (
    <button type="button" className="danger" disabled={disabled} aria-label={label} onClick={onClick}>
      {children}
    </button>
  );
}

/** Previous and next page buttons around "Page x of y"; nothing when everything fits on one page. */
export function Pager({
  page,
  total,
  pageSize,
  onPage,
  previous = "Previous",
  next = "Next",
}: {
  page: number;
  total: number;
  pageSize: number;
  onPage: (page: number) => void;
  previous?: string;
  next?: string;
}) {
  if (total <= pageSize) return null;
  return (
    <div className="toolbar">
      <button type="button" disabled={page <= 1} onClick={() => onPage(page - 1)}>
        {previous}
      </button>
      <span>
        Page {page} of {Math.ceil(total / pageSize)}
      </span>
      <button type="button" disabled={page * pageSize >= total} onClick={() => onPage(page + 1)}>
        {next}
      </button>
    </div>
  );
}

/** State of one asynchronous read: data, error and a reload function. */
export function useLoad<T>(load: () => Promise<T>, deps: unknown[] = []) {
  const [data, setData] = useState<T | undefined>(undefined);
  const [error, setError] = useState<unknown>(null);
  const [loading, setLoading] = useState(true);
  const loadRef = useRef(load);
  loadRef.current = load;
  const reload = useCallback(async () => {
    try {
      const value = await loadRef.current();
      setData(value);
      setError(null);
    } catch (err) {
      setError(err);
    } finally {
      setLoading(false);
    }
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, deps);
  useEffect(() => {
    setLoading(true);
    void reload();
  }, [reload]);
  return { data, error, loading, reload, setData };
}

/** Run an action, keeping its error and whether it is busy (for disabling buttons). */
export function useAction() {
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<unknown>(null);
  const run = useCallback(async (action: () => Promise<unknown>): Promise<boolean> => {
    setBusy(true);
    setError(null);
    try {
      await action();
      return true;
    } catch (err) {
      setError(err);
      return false;
    } finally {
      setBusy(false);
    }
  }, []);
  return { busy, error, run, setError };
}

/**
 * useAction for changes to what `reload` reads: `change` runs the action, then `onSuccess` if it
 * succeeded, then reads again whatever happened.
 */
export function useChange(reload: () => Promise<void>) {
  const action = useAction();
  const { run } = action;
  const change = useCallback(
    async (perform: () => Promise<unknown>, onSuccess?: () => void): Promise<boolean> => {
      const ok = await run(perform);
      if (ok) onSuccess?.();
      await reload();
      return ok;
    },
    [run, reload],
  );
  return { ...action, change };
}

/**
 * What a confirmation dialog asks about: `ask(target)` opens it, `dialog` holds <Confirm>'s state and
 * handlers; confirming calls `confirmed(target, close)`, which closes the dialog when it succeeds.
 */
export function useConfirm<T>(
  action: { busy: boolean; error: unknown },
  confirmed: (target: T, close: () => void) => Promise<unknown>,
) {
  const [target, setTarget] = useState<T | null>(null);
  const close = () => setTarget(null);
  const dialog = {
    open: target !== null,
    busy: action.busy,
    error: action.error,
    onClose: close,
    onConfirm: () => {
      if (target !== null) void confirmed(target, close);
    },
  };
  return { target, ask: setTarget, dialog };
}

/** A modal dialog (the native <dialog>: it traps focus and closes on Escape). */
export function Dialog({
  open,
  title,
  onClose,
  children,
}: {
  open: boolean;
  title: string;
  onClose: () => void;
  children: ReactNode;
}) {
  const ref = useRef<HTMLDialogElement>(null);
  useEffect(() => {
    const dialog = ref.current;
    if (!dialog) return;
    if (open && !dialog.open) {
      dialog.showModal();
      // The first field to fill, rather than the Close button showModal would pick.
      dialog.querySelector<HTMLElement>("[data-autofocus]")?.focus();
    }
    if (!open && dialog.open) dialog.close();
  }, [open]);
  const titleId = `dialog-${title.replace(/\W+/g, "-").toLowerCase()}`;
  return (
    <dialog ref={ref} aria-labelledby={titleId} onClose={onClose} onCancel={onClose}>
      <div className="dialog-head">
        <h2 id={titleId}>{title}</h2>
        <button type="button" className="icon" aria-label="Close" onClick={onClose}>
          ×
        </button>
      </div>
      {open ? children : null}
    </dialog>
  );
}

/** A confirmation dialog for what cannot be undone. */
export function Confirm({
  open,
  title,
  children,
  confirmLabel,
  onConfirm,
  onClose,
  busy,
  error,
}: {
  open: boolean;
  title: string;
  children: ReactNode;
  confirmLabel: string;
  onConfirm: () => void;
  onClose: () => void;
  busy?: boolean;
  error?: unknown;
}) {
  return (
    <Dialog open={open} title={title} onClose={onClose}>
      {children}
      <ErrorMessage error={error} />
      <div className="actions">
        <button type="button" onClick={onClose} data-autofocus>
          Cancel
        </button>
        <button type="button" className="danger" disabled={busy} onClick={onConfirm}>
          {confirmLabel}
        </button>
      </div>
    </Dialog>
  );
}

export function StatusBadge({ status }: { status: string }) {
  return <span className={`badge badge-${status}`}>{status}</span>;
}

/** Re-render every `ms` milliseconds (for clocks: uptime, time left). */
export function useNow(ms = 1000): number {
  const [now, setNow] = useState(() => Date.now());
  useEffect(() => {
    const timer = setInterval(() => setNow(Date.now()), ms);
    return () => clearInterval(timer);
  }, [ms]);
  return now;
}
