"""Diagnostic: the kernel sequence of one captured replay (name, µs), in order."""
import sys
sys.path.insert(0, ".")
from benchmarks.train_step import _cases, cudrop_step, selected
from cudrop import backend, graph
import cudrop.variants.sliceout as S
if "--two-pass" in sys.argv:
    S._both_on_device = lambda a, b: False
case = [c for c in _cases() if selected(c, [a for a in sys.argv[1:] if not a.startswith("--")])][0]
model, opt, step, batches = cudrop_step(case)
step = graph.capture(step, model=model, optimizer=opt)
for i in range(6):
    step(*batches[i % len(batches)])
backend.cupy.cuda.Device().synchronize()
from torch.profiler import ProfilerActivity, profile
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    step(*batches[0])
    backend.cupy.cuda.Device().synchronize()
ev = [e for e in prof.events() if e.device_type.name == "CUDA"]
ev.sort(key=lambda e: e.time_range.start)
for e in ev:
    print(f"{e.time_range.elapsed_us():8.1f}  {e.name[:110]}")
