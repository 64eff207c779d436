// Renders /openapi.json with the Swagger UI served by this API (no CDN: the docs work offline).
"use strict";
window.ui = SwaggerUIBundle({ url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true });
