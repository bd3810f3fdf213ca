"use client";

import Link from "next/link";
import { usePathname } from "next/navigation";

const LINKS = [
  { href: "/admin/", label: "Monitoring" },
  { href: "/admin/users/", label: "Users" },
  { href: "/admin/environments/", label: "Environments" },
  { href: "/admin/applications/", label: "Applications" },
  { href: "/admin/usage/", label: "Usage" },
  { href: "/admin/audit/", label: "Audit trail" },
];

export function AdminNav() {
  const pathname = usePathname();
  return (
    <nav aria-label="Administration" className="subnav">
      <ul>
        {LINKS.map((link) => (
          <li key={link.href}>
            <Link href={link.href} aria-current={pathname === link.href ? "page" : undefined}>
              {link.label}
            </Link>
          </li>
        ))}
      </ul>
    </nav>
  );
}
