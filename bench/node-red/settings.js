// Node-RED settings for the Lantern benchmark (bench/node_red.py sets the environment).
// Headless: no editor and no HTTP server, the leanest Node-RED there is (a stricter RSS
// comparison than the usual install with the editor).
const path = require("path");

const modules = process.env.LANTERN_NR_MODULES;
const keys = {};
for (const [node, hex] of Object.entries(JSON.parse(process.env.LANTERN_NR_KEYS || "{}"))) {
    keys[node] = Buffer.from(hex, "hex");
}

module.exports = {
    flowFile: process.env.LANTERN_NR_FLOW,
    userDir: process.env.LANTERN_NR_USERDIR,
    httpAdminRoot: false,
    httpNodeRoot: false,
    credentialSecret: false,
    telemetry: {enabled: false, updateNotification: false},
    diagnostics: {enabled: false, ui: false},
    functionExternalModules: false,
    functionGlobalContext: {
        cbor: require(path.join(modules, "cbor-x")),
        crypto: require("crypto"),
        keys: keys,
        // agent/units.py: the unit a canonical measurement name implies (docs/protocol.md)
        units: JSON.parse(process.env.LANTERN_NR_UNITS || "{}"),
    },
    logging: {console: {level: "info", metrics: false, audit: false}},
};
