import type { NextConfig } from "next";

// A static export: `cmbcluster serve` serves the files in out/ at / beside the API, so one
// process and one pip install give the whole product. Every page is a real file (no dynamic
// segments: ids travel in the query string), so no server-side routing is needed.
const config: NextConfig = {
  output: "export",
  trailingSlash: true,
  images: { unoptimized: true },
  reactStrictMode: true,
  productionBrowserSourceMaps: false,
};

export default config;
