// Count what the receiver refused; a lost batch shows up as missing readings anyway.
if (msg.statusCode < 200 || msg.statusCode > 299) {
    const n = (context.get("failed") || 0) + 1;
    context.set("failed", n);
    if (n === 1) node.warn("upstream answered " + msg.statusCode);
}
return null;
