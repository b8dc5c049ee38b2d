# Gloom as a twistd application file:  twistd -ny etc/gloom.tac
# It builds the same service as `twistd -n gloom`.  Every option of
# `twistd gloom` is below, set to its default; edit the settings you need.
from twisted.application.service import Application

from gloom.tap import Options, makeService

MASTER = "tcp:9998:interface=127.0.0.1"   # where masters connect (an endpoint string)
SLAVE = "tcp:9999:interface=127.0.0.1"    # where slaves connect (an endpoint string)
MAX_FRAME = 64 * 1024 * 1024              # largest frame a peer may send, in bytes (1 to 2**32 - 1)
RETRIES = 3                               # times a job is queued again after its slave
                                          # disconnects or its attempt times out
JOB_TIMEOUT = None                        # seconds one attempt may run when the submit names
                                          # no timeout (up to 2592000); None: no limit
FRAME_TIMEOUT = 30                        # seconds a connection may stay part way through a
                                          # frame or its TLS handshake before it is closed
MAX_QUEUED = 100000                       # unfinished jobs one master may have at once
HTTP = None                               # where /status and /metrics are served, e.g.
                                          # "tcp:9997:interface=127.0.0.1"; None: off

settings = {
    "--master": MASTER,
    "--slave": SLAVE,
    "--max-frame": MAX_FRAME,
    "--retries": RETRIES,
    "--job-timeout": JOB_TIMEOUT,
    "--frame-timeout": FRAME_TIMEOUT,
    "--max-queued": MAX_QUEUED,
    "--http": HTTP,
}
options = Options()
options.parseOptions([str(part) for option, value in settings.items() if value is not None
                      for part in (option, value)])

application = Application("gloom")
makeService(options).setServiceParent(application)
