"use client";

import { useEffect, useState } from "react";
import { ErrorMessage, Loading } from "@/components/ui";
import { api, type Provider, unwrap } from "@/lib/api";

/** Only same-site paths: the API refuses others too, this keeps the link honest. */
// A relative path on this site (an environment on a host of its own comes back through its
// /api/v1/environments/<id>/enter path); the server accepts an absolute URL only on its own host.
function safeNext(raw: string | null): string {
  if (!raw) return "/";
  if (raw.startsWith("/") && !raw.startsWith("//")) return raw;
  return /^https?:\/\//.test(raw) ? raw : "/";
}

export default function SignInPage() {
  const [providers, setProviders] = useState<Provider[] | null>(null);
  const [error, setError] = useState<unknown>(null);
  const [next, setNext] = useState("/");
  const [refused, setRefused] = useState<string | null>(null);
  const [signedOut, setSignedOut] = useState(false);

  useEffect(() => {
    const query = new URLSearchParams(window.location.search);
    setNext(safeNext(query.get("next")));
    setRefused(query.get("error")); // why the last sign-in was refused, from the server's callback
    setSignedOut(query.has("signed_out"));
    unwrap(api.GET("/api/v1/auth/providers")).then((answer) => setProviders(answer.providers), setError);
  }, []);

  return (
    <main id="main" className="signin">
      <h1>Sign in to CMBCluster</h1>
      <p className="muted">Your research environments, with your own bucket mounted as a folder.</p>
      {signedOut ? (
        <p role="status" className="notice ok">
          You are signed out. Your environments keep running until they stop by themselves or you stop them.
        </p>
      ) : null}
      {refused ? (
        <p role="alert" className="error">
          Sign-in refused: {refused}
        </p>
      ) : null}
      <ErrorMessage error={error} />
      {providers === null && !error ? <Loading what="Finding the sign-in providers" /> : null}
      {providers && providers.length === 0 ? (
        <p role="alert" className="error">
          No sign-in provider is enabled on this server; ask its operator to configure one.
        </p>
      ) : null}
      <ul className="providers">
        {providers?.map((provider) => (
          <li key={provider.name}>
            <a className="button primary" href={`${provider.login_url}?next=${encodeURIComponent(next)}`}>
              Sign in with {provider.display_name}
            </a>
            {provider.kind === "development" ? (
              <p className="muted small">Development sign-in: only for trying CMBCluster on this machine.</p>
            ) : null}
          </li>
        ))}
      </ul>
    </main>
  );
}
