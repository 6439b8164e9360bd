import { defineConfig } from "vite";

// One build serves every test: the page reads herald's address, the keys and
// the feed from its query string. Relative asset paths let any static server
// (tests/browser.rs serves dist/) host it.
export default defineConfig({
  base: "./",
  logLevel: "warn",
  build: {
    outDir: "dist",
    emptyOutDir: true,
    chunkSizeWarningLimit: 4096,
    rolldownOptions: {
      // Knock's UI libraries mark their modules "use client" (for Next.js); meaningless in a plain bundle.
      onwarn(warning, warn) {
        if (warning.code !== "MODULE_LEVEL_DIRECTIVE") warn(warning);
      },
    },
  },
});
