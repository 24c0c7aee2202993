// Build ComfyUI /view URLs for saved images. Only ComfyUI's own folder types; everything encoded.

const FOLDER_TYPES = ["temp", "output", "input"];

/**
 * The /view URL of a saved image ({filename, subfolder, type}) or null when it is not a valid ComfyUI result.
 * `apiURL` is api.apiURL from ComfyUI's scripts/api.js (adds the server's base path); identity by default.
 */
export function viewURL(image, apiURL = (p) => p) {
  if (!image || typeof image.filename !== "string" || image.filename === "") return null;
  const type = image.type === undefined ? "output" : image.type;
  if (!FOLDER_TYPES.includes(type)) return null;
  const subfolder = typeof image.subfolder === "string" ? image.subfolder : "";
  const path = "/view?filename=" + encodeURIComponent(image.filename) +
    "&type=" + encodeURIComponent(type) +
    "&subfolder=" + encodeURIComponent(subfolder);
  const url = apiURL(path);
  // never point outside ComfyUI's server: the result must stay a relative (same-origin) path
  if (typeof url !== "string" || !url.startsWith("/") || url.startsWith("//")) return null;
  return url;
}
