import Link from "next/link";

export default function NotFound() {
  return (
    <main id="main" className="signin">
      <h1>Page not found</h1>
      <p>
        There is no page at this address. <Link href="/">Go to the dashboard</Link>.
      </p>
    </main>
  );
}
