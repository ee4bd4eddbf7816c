"""Run by test_shared_memory_daemon.py in its own process (tritonclient's stubs clash with sealbox's):
Triton's system shared-memory extension driven by stock tritonclient, as its docs show it.
Prints one JSON object of findings. argv: target, model, tag (region names are unique per run), and
"killed" for one call that the test's killing of the worker ends."""
import json
import os
import sys

import numpy as np
import tritonclient.grpc as tc
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

target, model, tag = sys.argv[1], sys.argv[2], sys.argv[3]
client = tc.InferenceServerClient(url=target)
out = {}


def error(fn):
    try:
        fn()
    except InferenceServerException as exc:
        return [exc.status(), exc.message()]
    return None


x = np.random.default_rng(7).standard_normal([5, 4]).astype(np.float32)
y_bytes = 5 * 3 * 4
in_handle = shm.create_shared_memory_region(f"in-{tag}", f"/sealbox-{tag}-in", 4096 + x.nbytes)
out_handle = shm.create_shared_memory_region(f"out-{tag}", f"/sealbox-{tag}-out", 8192)
try:
    shm.set_shared_memory_region(in_handle, [x], offset=4096)
    client.register_system_shared_memory(f"in-{tag}", f"/sealbox-{tag}-in", 4096 + x.nbytes)
    client.register_system_shared_memory(f"out-{tag}", f"/sealbox-{tag}-out", 8192)
    out["status"] = sorted(client.get_system_shared_memory_status(as_json=True).get("regions", {}))

    def call(in_offset=4096, in_size=x.nbytes, out_offset=100, out_size=y_bytes, region=f"in-{tag}", shape=x.shape):
        inp = tc.InferInput("x", list(shape), "FP32")
        inp.set_shared_memory(region, in_size, offset=in_offset)
        want = tc.InferRequestedOutput("y")
        want.set_shared_memory(f"out-{tag}", out_size, offset=out_offset)
        result = client.infer(model, [inp], outputs=[want])
        meta = result.get_output("y")
        return shm.get_contents_as_numpy(out_handle, np.float32, list(meta.shape), offset=out_offset)

    if len(sys.argv) > 4 and sys.argv[4] == "killed":   # the test kills the worker while this call waits
        out["killed"] = error(call)
        client.unregister_system_shared_memory()
        print(json.dumps(out))
        sys.exit(0)
    out["x"] = x.tolist()
    out["y"] = call().tolist()
    # A smaller input next: the worker's input arena still holds the larger one's bytes past its end.
    small = np.random.default_rng(8).standard_normal([2, 4]).astype(np.float32)
    shm.set_shared_memory_region(in_handle, [small], offset=4096)
    out["x_small"] = small.tolist()
    out["y_small"] = call(in_size=small.nbytes, out_size=2 * 3 * 4, shape=small.shape).tolist()
    # Five rows declared, two rows' bytes given: the other three must not come from the arena's past.
    out["shape_past_its_bytes"] = error(lambda: call(in_size=small.nbytes))
    shm.set_shared_memory_region(in_handle, [x], offset=4096)
    # Input in shared memory, output in the response (a mix, as tritonclient allows).
    inp = tc.InferInput("x", list(x.shape), "FP32")
    inp.set_shared_memory(f"in-{tag}", x.nbytes, offset=4096)
    out["y_raw"] = client.infer(model, [inp]).as_numpy("y").tolist()
    out["unregistered"] = error(lambda: call(region="no-such-region"))
    out["past_the_region"] = error(lambda: call(in_offset=4096 + 16))
    out["output_too_small"] = error(lambda: call(out_size=8))
    out["output_past_the_region"] = error(lambda: call(out_offset=8192 - 8))
    out["twice"] = error(lambda: client.register_system_shared_memory(f"in-{tag}", f"/sealbox-{tag}-in", 16))
    out["missing_object"] = error(lambda: client.register_system_shared_memory(
        f"gone-{tag}", f"/sealbox-{tag}-missing", 16))
    # An object owned by a user the listener does not accept (the test makes it nobody's).
    os.chown(f"/dev/shm/sealbox-{tag}-in", 65534, -1)
    out["foreign_owner"] = error(lambda: client.register_system_shared_memory(
        f"foreign-{tag}", f"/sealbox-{tag}-in", 16))
    os.chown(f"/dev/shm/sealbox-{tag}-in", os.getuid(), -1)
    out["stream"] = None
    client.unregister_system_shared_memory(f"in-{tag}")
    out["status_after_unregister"] = sorted(client.get_system_shared_memory_status(as_json=True).get("regions", {}))
    out["after_unregister"] = error(lambda: call())
    client.unregister_system_shared_memory()
    out["status_after_unregister_all"] = sorted(client.get_system_shared_memory_status(as_json=True).get("regions", {}))
finally:
    shm.destroy_shared_memory_region(in_handle)
    shm.destroy_shared_memory_region(out_handle)
print(json.dumps(out))
