"""Training jobs: footage submitted to the server, trained by `vad worker` processes.

One job per module:

- ``layout``: where jobs keep their files (the queue database, uploads, checkpoints) and where
  footage named by path may come from;
- ``store``: the durable queue that the server and the workers share (``JobStore``, ``SqlJobStore``);
- ``options``: the client's options checked, and the training configuration fixed at submission;
- ``form``: receiving a submission's multipart body;
- ``views``: a job's public JSON;
- ``activation``: the activation policy applied to the version a job published;
- ``service``: the server's side (``TrainingService``: submit, list, cancel, and the watcher);
- ``worker``: `vad worker`, which claims jobs and trains them.

The worker uses only ``layout``, ``store`` and ``options``: nothing of the HTTP side.
"""
