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
RETRY_BACKOFF = 1                         # seconds before the first retry of a detached job
                                          # (or one submitted with backoff); doubles each time
RETRY_BACKOFF_MAX = 300                   # most seconds any retry waits
KEEP_RESULTS = 600                        # seconds the end of a detached job is kept for status
KEEP_RESULTS_MAX = 100000                 # most ends of detached jobs kept at once
KEEP_RESULTS_BYTES = 64 * 1024 * 1024     # most bytes of their answers kept at once
DEAD_MAX = 10000                          # most jobs on the dead list (0: none)
MAX_DETACHED = 1000000                    # most detached jobs queued, delayed or running
JOURNAL = None                            # SQLite file keeping detached, delayed and dead
                                          # jobs across restarts, e.g. "/var/lib/gloom/journal.db";
                                          # None: nothing on disk
JOURNAL_SYNC = "normal"                   # "full": commits survive a power cut; "normal":
                                          # a process crash
HTTP = None                               # where /status, /metrics and the /api/ JSON API are
                                          # served, e.g. "tcp:9997:interface=127.0.0.1"; None: off
ADMIN_TOKEN_FILE = None                   # file holding the bearer token (16 or more characters)
                                          # that allows the /api/ actions, e.g.
                                          # "/etc/gloom/admin-token"; None: read-only API
ADMIN = False                             # True: masters may pause, resume and clear types
                                          # and drain the daemon
ADMIN_ENDPOINT = None                     # another endpoint for masters where those actions
                                          # are allowed, e.g. "unix:/run/gloom/admin.sock";
                                          # None: off
WARM_UP = None                            # synthetic jobs run over loopback before the ports
                                          # open, so PyPy's JIT is warm for the first real
                                          # jobs (0: none); None: 30000 on PyPy, 0 on CPython

settings = {
    "--master": MASTER,
    "--slave": SLAVE,
    "--max-frame": MAX_FRAME,
    "--retries": RETRIES,
    "--job-timeout": JOB_TIMEOUT,
    "--frame-timeout": FRAME_TIMEOUT,
    "--max-queued": MAX_QUEUED,
    "--retry-backoff": RETRY_BACKOFF,
    "--retry-backoff-max": RETRY_BACKOFF_MAX,
    "--keep-results": KEEP_RESULTS,
    "--keep-results-max": KEEP_RESULTS_MAX,
    "--keep-results-bytes": KEEP_RESULTS_BYTES,
    "--dead-max": DEAD_MAX,
    "--max-detached": MAX_DETACHED,
    "--journal": JOURNAL,
    "--journal-sync": JOURNAL_SYNC,
    "--http": HTTP,
    "--admin-token-file": ADMIN_TOKEN_FILE,
    "--admin": ADMIN,
    "--admin-endpoint": ADMIN_ENDPOINT,
    "--warm-up": WARM_UP,
}
arguments = []
for option, value in settings.items():
    if value is True:
        arguments.append(option)
    elif value is not None and value is not False:
        arguments += [option, str(value)]
options = Options()
options.parseOptions(arguments)

application = Application("gloom")
makeService(options).setServiceParent(application)
