"""Ctrl-C as a terminal sends it (SIGINT to the whole process group) to torchrun with 2 ranks."""
import os, signal, subprocess, sys, time
cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
       "vanilla_diffusion.py", "train", "--cond", "--data-dir", "../shared/data",
       "--out-dir", "runs/ddp_cut", "--device", "cpu", "--max-steps", "5000"]
p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                     start_new_session=True,
                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
time.sleep(25)
os.killpg(p.pid, signal.SIGINT)
out = p.communicate(timeout=120)[0]
print("exit", p.returncode)
print("\n".join(l for l in out.splitlines() if "step" in l or "interrupt" in l or "rror" in l)[-1500:])
