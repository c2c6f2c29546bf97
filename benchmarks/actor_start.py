"""How long a plain Ray actor takes to start on an embedded Ray with and without a job runtime env (6 actors one
after another, each's first call awaited): `python benchmarks/actor_start.py env|none [SLEEP_S]`."""
import sys
import time

import ray

t0 = time.time()
env = {"env_vars": {"DS_ACCELERATOR": "cpu"}} if sys.argv[1] == "env" else None
ray.init(num_cpus=2, include_dashboard=False, runtime_env=env)
print("init", round(time.time() - t0, 2))


@ray.remote(num_cpus=0)
class A:
    def pid(self):
        import os

        return os.getpid()


time.sleep(float(sys.argv[2]) if len(sys.argv) > 2 else 0)
for i in range(6):
    t = time.time()
    a = A.remote()
    p = ray.get(a.pid.remote())
    print(i, p, round(time.time() - t, 2))
