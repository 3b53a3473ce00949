// loraloop console: the little JavaScript the pages need. No framework, no build step.
"use strict";
function csrfToken() {
  const m = document.querySelector('meta[name="csrf-token"]');
  return m ? m.content : "";
}
