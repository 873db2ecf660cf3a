// One POST of SenML-JSON per batch: the join node hands over an array of per-frame arrays.
msg.payload = JSON.stringify([].concat(...msg.payload));
msg.headers = {"content-type": "application/senml+json"};
return msg;
