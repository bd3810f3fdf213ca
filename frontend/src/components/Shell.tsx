"use client";

import Link from "next/link";
import { usePathname } from "next/navigation";
import { createContext, type ReactNode, useContext, useEffect, useState } from "react";
import { api, type User, unwrap } from "@/lib/api";
import { ErrorMessage, Loading, Name } from "./ui";

const UserContext = createContext<User | null>(null);

/** The signed-in user (the Shell renders its pages only once known). */
export function useUser(): User {
  const user = useContext(UserContext);
  if (!user) throw new Error("useUser outside the Shell");
  return user;
}

const NAV = [
  { href: "/", label: "Dashboard" },
  { href: "/applications/", label: "Applications" },
  { href: "/environments/", label: "Environments" },
  { href: "/storage/", label: "Storage" },
  { href: "/settings/", label: "Settings" },
];

function isCurrent(pathname: string, href: string): boolean {
  return href === "/" ? pathname === "/" : pathname.startsWith(href);
}

/** The signed-in frame: header, navigation, and the page once the user is known. */
export function Shell({ children }: { children: ReactNode }) {
  const pathname = usePathname();
  const [user, setUser] = useState<User | null>(null);
  const [error, setError] = useState<unknown>(null);
  const [menuOpen, setMenuOpen] = useState(false);

  useEffect(() => {
    unwrap(api.GET("/api/v1/auth/me")).then(setUser, setError);
  }, []);
  useEffect(() => setMenuOpen(false), [pathname]);

  async function signOut() {
    await api.POST("/api/v1/auth/logout");
    window.location.assign("/signin/?signed_out=1");
  }

  const links = user?.role === "admin" ? [...NAV, { href: "/admin/", label: "Admin" }] : NAV;
  return (
    <>
      <a className="skip" href="#main">
        Skip to content
      </a>
      <header className="top">
        <Link href="/" className="brand">
          CMBCluster
        </Link>
        <button
          type="button"
          className="menu-toggle"
          aria-expanded={menuOpen}
          aria-controls="main-nav"
          onClick={() => setMenuOpen(!menuOpen)}
        >
          Menu
        </button>
        <nav id="main-nav" aria-label="Main" className={menuOpen ? "open" : undefined}>
          <ul>
            {links.map((link) => (
              <li key={link.href}>
                <Link href={link.href} aria-current={isCurrent(pathname, link.href) ? "page" : undefined}>
                  {link.label}
                </Link>
              </li>
            ))}
          </ul>
        </nav>
        {user ? (
          <div className="who">
            <Name text={user.name || user.email} />
            <button type="button" onClick={signOut}>
              Sign out
            </button>
          </div>
        ) : null}
      </header>
      <main id="main" tabIndex={-1}>
        {user ? (
          <UserContext.Provider value={user}>{children}</UserContext.Provider>
        ) : error ? (
          <>
            <ErrorMessage error={error} />
            <p>
              <a href="/signin/">Sign in again</a>
            </p>
          </>
        ) : (
          <Loading what="Signing you in" />
        )}
      </main>
    </>
  );
}
