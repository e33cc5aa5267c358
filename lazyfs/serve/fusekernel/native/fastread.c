/* The warm READ path of the FUSE worker threads, in C (docs/warm.md §4).
 *
 * ``Server.serve`` reads requests from /dev/fuse with the GIL released and answers, by itself,
 * every READ whose blocks the export's flat layer files hold: one pread per run of blocks of a
 * layer, the blake3-128 of every 4 KiB block checked against the layer's map (the same check as
 * ``LayerFlats.read_local_into``), the reply written with writev. Anything else (another opcode, a
 * handle with no plan, a block not held, a hash mismatch, a mapped segment, a short read) is
 * returned to Python untouched, which answers it as before: C only ever answers what Python would
 * have answered the same way, and declines everything it is not sure of.
 *
 * A *plan* (``Server.add``) is one open handle's view of its export: the device's segments as
 * sorted extents (zeros, a layer, or "decline") and, per layer, the flat file's fd, its map's bit
 * array and its hash array (Python buffers, held until the plan is freed). The maps are read
 * without locks while Python sets and clears bits: a race can cost a decline, never a wrong
 * byte, because a block is served only if its bytes hash as the map says.
 *
 * Local readahead (docs/warm.md §4): after answering a buffered READ, the thread counts it in its
 * window of the plan; a window read densely enough whose blocks are all held is queued, and the hint
 * thread (``hints``) asks the kernel to read it whole into the page cache with posix_fadvise
 * WILLNEED on the daemon's own file of the export. Reader threads never wait for a hint: the queue
 * is bounded and drops, and only the hint thread calls fadvise.
 *
 * Lifetimes: a plan is referenced by the table and by each read in flight. ``discard`` drops the
 * table's reference; the last reference frees it, and a plan whose last read ends in a worker
 * thread (no GIL) is queued and freed by the next call that holds the GIL.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <fcntl.h>
#include <linux/fuse.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#include "blake3/blake3.h"

#define HASH_LEN 16
#define UNIQUE_RESEND (1ULL << 63)
#define KIND_ZEROS (-1)
#define KIND_DECLINE (-2)
#define MAX_EXTENT_BLOCKS (1ULL << 40)
#define MAX_COUNTERS 4

/* ------------------------------------------------------------------ Counter */

typedef struct {
    PyObject_HEAD
    unsigned long long reads;     /* READs answered */
    unsigned long long bytes;     /* bytes answered */
    unsigned long long blocks;    /* layer blocks read and checked */
    unsigned long long inflight;  /* reads being answered now */
    unsigned long long declined;  /* READs of a planned handle handed back to Python */
    unsigned long long reply_errors; /* replies the kernel refused (the request was interrupted) */
    unsigned long long hints;     /* windows the kernel was asked to read ahead (local_readahead) */
} CounterObject;

static PyMemberDef Counter_members[] = {
    {"reads", T_ULONGLONG, offsetof(CounterObject, reads), READONLY, "READs answered"},
    {"bytes", T_ULONGLONG, offsetof(CounterObject, bytes), READONLY, "bytes answered"},
    {"blocks", T_ULONGLONG, offsetof(CounterObject, blocks), READONLY, "layer blocks read and checked"},
    {"inflight", T_ULONGLONG, offsetof(CounterObject, inflight), READONLY, "reads being answered now"},
    {"declined", T_ULONGLONG, offsetof(CounterObject, declined), READONLY, "READs handed back to Python"},
    {"reply_errors", T_ULONGLONG, offsetof(CounterObject, reply_errors), READONLY, "replies refused"},
    {"hints", T_ULONGLONG, offsetof(CounterObject, hints), READONLY, "windows queued for kernel readahead"},
    {NULL},
};

static PyTypeObject CounterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "lazyfs.serve.fusekernel._fastread.Counter",
    .tp_basicsize = sizeof(CounterObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The C path's counters of one export (read without locks: each field is one word).",
    .tp_members = Counter_members,
    .tp_new = PyType_GenericNew,
};

#define ADD(field, n) __atomic_add_fetch(&(field), (n), __ATOMIC_RELAXED)
#define SUB(field, n) __atomic_sub_fetch(&(field), (n), __ATOMIC_RELAXED)

/* --------------------------------------------------------------------- Plan */

typedef struct {
    uint64_t start, end; /* device blocks [start, end) */
    int32_t kind;        /* >= 0: layer index; KIND_ZEROS; KIND_DECLINE */
} Extent;

typedef struct {
    int fd;
    const uint8_t *bits;   /* one bit per block: held */
    const uint8_t *hashes; /* HASH_LEN bytes per block */
    uint64_t blocks;
} LayerFile;

typedef struct Plan {
    uint64_t fh, size;
    uint32_t block_size;
    Extent *extents;
    size_t nextents;
    LayerFile *files;
    size_t nfiles;
    Py_buffer *views; /* 2 per file: bits, hashes */
    CounterObject *counters[MAX_COUNTERS]; /* the export's first; the device's, the block cache's (or NULL) */
    int hint_fd;            /* the daemon's own open file of the export (-1: no hints); Python owns it */
    uint64_t hint_token;    /* names that file among the server's registered ones */
    uint64_t window;        /* blocks per readahead window (0: no hints) */
    uint64_t nwindows;
    uint8_t *seen;          /* per window: READs answered in it since it was last asked for (saturating) */
    unsigned hint_after;    /* READs a window needs before one asks for all of it */
    long refs; /* under the server's lock */
    struct Plan *next_dead;
} Plan;

static void plan_free(Plan *plan) /* with the GIL */
{
    if (plan == NULL)
        return;
    if (plan->views != NULL) {
        for (size_t i = 0; i < 2 * plan->nfiles; i++)
            if (plan->views[i].obj != NULL)
                PyBuffer_Release(&plan->views[i]);
        PyMem_Free(plan->views);
    }
    PyMem_Free(plan->extents);
    PyMem_Free(plan->files);
    PyMem_Free(plan->seen);
    for (int i = 0; i < MAX_COUNTERS; i++)
        Py_XDECREF(plan->counters[i]);
    PyMem_Free(plan);
}

/* ------------------------------------------------------------------- Server */

#define HINT_QUEUE 64          /* windows waiting for the hint thread; more are dropped */
#define HINT_PIECE (128 << 10) /* bytes per fadvise: the kernel caps one at the bdi's io_pages */
#define HINT_DENSITY_PAGES (8 * 4096) /* a window is asked for after one READ per 8 of its pages... */
#define HINT_AFTER_MIN 2                /* ...and at least 2 */

typedef struct {
    int fd;
    uint64_t token, off, len;
} Hint;

typedef struct {
    int fd;
    uint64_t token;
} HintFile;

typedef struct {
    PyObject_HEAD
    pthread_mutex_t lock;   /* the table, the plans' refs, the dead list */
    pthread_mutex_t leader; /* one thread reads /dev/fuse at a time */
    Plan **table;
    size_t ntable, cap;
    Plan *dead;
    int stopped;
    /* local readahead (docs/warm.md §4): under hint_lock */
    pthread_mutex_t hint_lock;
    pthread_cond_t hint_cond;
    Hint queue[HINT_QUEUE];
    size_t qhead, qlen;
    HintFile *files; /* the files hints may be given through (registered by Python) */
    size_t nfiles, capfiles;
    HintFile busy;   /* the file the hint thread is using now (fd -1: none) */
    int hints_stopped;
    unsigned long long hints_dropped, hints_issued;
} ServerObject;

static void bury_dead(ServerObject *self) /* with the GIL */
{
    pthread_mutex_lock(&self->lock);
    Plan *p = self->dead;
    self->dead = NULL;
    pthread_mutex_unlock(&self->lock);
    while (p != NULL) {
        Plan *next = p->next_dead;
        plan_free(p);
        p = next;
    }
}

/* Drop one reference (under the lock); a plan with none left goes to the dead list. */
static void unref_locked(ServerObject *self, Plan *plan)
{
    if (--plan->refs == 0) {
        plan->next_dead = self->dead;
        self->dead = plan;
    }
}

static PyObject *Server_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    ServerObject *self = (ServerObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    pthread_mutex_init(&self->lock, NULL);
    pthread_mutex_init(&self->leader, NULL);
    pthread_mutex_init(&self->hint_lock, NULL);
    pthread_cond_init(&self->hint_cond, NULL);
    self->busy.fd = -1;
    return (PyObject *)self;
}

static void Server_dealloc(ServerObject *self)
{
    /* no thread can be in serve(): each holds a reference to the server while it runs */
    pthread_mutex_lock(&self->lock);
    for (size_t i = 0; i < self->ntable; i++)
        unref_locked(self, self->table[i]);
    self->ntable = 0;
    pthread_mutex_unlock(&self->lock);
    bury_dead(self);
    PyMem_Free(self->table);
    PyMem_RawFree(self->files);
    pthread_mutex_destroy(&self->lock);
    pthread_mutex_destroy(&self->leader);
    pthread_mutex_destroy(&self->hint_lock);
    pthread_cond_destroy(&self->hint_cond);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static Py_ssize_t find_locked(ServerObject *self, uint64_t fh)
{
    for (size_t i = 0; i < self->ntable; i++)
        if (self->table[i]->fh == fh)
            return (Py_ssize_t)i;
    return -1;
}

/* Remove fh's plan from the table (under the lock); 1 if there was one. */
static int discard_locked(ServerObject *self, uint64_t fh)
{
    Py_ssize_t i = find_locked(self, fh);
    if (i < 0)
        return 0;
    Plan *plan = self->table[i];
    self->table[i] = self->table[--self->ntable];
    unref_locked(self, plan);
    return 1;
}

static int get_buffer(PyObject *obj, Py_buffer *view, Py_ssize_t need, const char *what)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_SIMPLE) < 0)
        return -1;
    if (view->len < need) {
        PyErr_Format(PyExc_ValueError, "%s holds %zd bytes, the plan needs %zd", what, view->len, need);
        PyBuffer_Release(view);
        view->obj = NULL;
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(Server_add_doc,
"add(fh, counters, size, block_size, extents, files, hint_fd=-1, hint_token=0, window=0)\n\n"
"Plan the READs of handle *fh* (replacing any plan it had): *size* bytes of device, *extents*\n"
"packed as <QQi4x (start block, end block, kind: a layer index, -1 zeros, -2 decline), sorted\n"
"and disjoint; *files*, per layer, (fd, bits, hashes, blocks): the flat file and its map's\n"
"buffers (fd -1: not open, its extents are declined). *counters*: 1 to 4 Counters, each\n"
"counting what is answered (the export's first; the in-flight count is kept in it only).\n"
"*window* > 0: blocks per readahead window. A READ answered in a window that had one READ per 8\n"
"of its pages (at least 2) since it was last asked for, and whose blocks are all local, asks the\n"
"kernel, through the registered file *hint_fd* (``hint_file``), to read the whole window into the\n"
"page cache.");

static PyObject *Server_add(ServerObject *self, PyObject *args)
{
    unsigned long long fh, size;
    unsigned int block_size;
    PyObject *counters, *files;
    Py_buffer ext;
    int hint_fd = -1;
    unsigned long long hint_token = 0, window = 0;
    if (!PyArg_ParseTuple(args, "KO!KIy*O|iKK", &fh, &PyTuple_Type, &counters, &size, &block_size, &ext, &files,
                          &hint_fd, &hint_token, &window))
        return NULL;
    Py_ssize_t ncounters = PyTuple_GET_SIZE(counters);
    if (ncounters < 1 || ncounters > MAX_COUNTERS) {
        PyBuffer_Release(&ext);
        PyErr_SetString(PyExc_ValueError, "1 to 4 counters");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < ncounters; i++)
        if (!PyObject_TypeCheck(PyTuple_GET_ITEM(counters, i), &CounterType)) {
            PyBuffer_Release(&ext);
            PyErr_SetString(PyExc_TypeError, "counters must be Counter objects");
            return NULL;
        }
    Plan *plan = PyMem_Calloc(1, sizeof(Plan));
    if (plan == NULL) {
        PyBuffer_Release(&ext);
        return PyErr_NoMemory();
    }
    plan->fh = fh;
    plan->size = size;
    plan->block_size = block_size;
    for (Py_ssize_t i = 0; i < ncounters; i++) {
        PyObject *c = PyTuple_GET_ITEM(counters, i);
        Py_INCREF(c);
        plan->counters[i] = (CounterObject *)c;
    }
    plan->refs = 1;
    plan->hint_fd = -1;
    const size_t rec = 24;
    if (block_size == 0 || block_size % 512 != 0 || ext.len % rec != 0) {
        PyErr_SetString(PyExc_ValueError, "bad block size or extents");
        goto fail;
    }
    if (window > 0 && hint_fd >= 0) {
        uint64_t blocks = (size + block_size - 1) / block_size;
        if (window > MAX_EXTENT_BLOCKS || blocks > MAX_EXTENT_BLOCKS) {
            PyErr_SetString(PyExc_ValueError, "window or size too large");
            goto fail;
        }
        plan->nwindows = (blocks + window - 1) / window;
        plan->seen = PyMem_Calloc(plan->nwindows, 1);
        if (plan->seen == NULL) {
            PyErr_NoMemory();
            goto fail;
        }
        plan->hint_fd = hint_fd;
        plan->hint_token = hint_token;
        plan->window = window;
        uint64_t pages = window * block_size / HINT_DENSITY_PAGES;
        plan->hint_after = pages < HINT_AFTER_MIN ? HINT_AFTER_MIN : pages > 250 ? 250 : (unsigned)pages;
    }
    if (!PySequence_Check(files)) {
        PyErr_SetString(PyExc_TypeError, "files must be a sequence");
        goto fail;
    }
    Py_ssize_t nfiles = PySequence_Size(files);
    if (nfiles < 0)
        goto fail;
    plan->nfiles = (size_t)nfiles;
    plan->files = PyMem_Calloc(nfiles ? nfiles : 1, sizeof(LayerFile));
    plan->views = PyMem_Calloc(2 * (nfiles ? nfiles : 1), sizeof(Py_buffer));
    if (plan->files == NULL || plan->views == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    for (Py_ssize_t i = 0; i < nfiles; i++) {
        PyObject *item = PySequence_GetItem(files, i);
        if (item == NULL)
            goto fail;
        int fd;
        PyObject *bits, *hashes;
        unsigned long long blocks;
        int ok = PyArg_ParseTuple(item, "iOOK", &fd, &bits, &hashes, &blocks);
        if (ok && blocks > MAX_EXTENT_BLOCKS) {
            PyErr_SetString(PyExc_ValueError, "layer file too large");
            ok = 0;
        }
        if (ok)
            ok = get_buffer(bits, &plan->views[2 * i], (Py_ssize_t)((blocks + 7) / 8), "a bit array") == 0 &&
                 get_buffer(hashes, &plan->views[2 * i + 1], (Py_ssize_t)(blocks * HASH_LEN), "a hash array") == 0;
        Py_DECREF(item);
        if (!ok)
            goto fail;
        plan->files[i] = (LayerFile){fd, plan->views[2 * i].buf, plan->views[2 * i + 1].buf, blocks};
    }
    size_t n = (size_t)ext.len / rec;
    plan->extents = PyMem_Calloc(n ? n : 1, sizeof(Extent));
    if (plan->extents == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    uint64_t prev_end = 0;
    for (size_t i = 0; i < n; i++) {
        const uint8_t *r = (const uint8_t *)ext.buf + i * rec;
        Extent e;
        memcpy(&e.start, r, 8);
        memcpy(&e.end, r + 8, 8);
        memcpy(&e.kind, r + 16, 4);
        if (e.start < prev_end || e.end <= e.start || e.kind < KIND_DECLINE || (e.kind >= 0 && (size_t)e.kind >= plan->nfiles)) {
            PyErr_SetString(PyExc_ValueError, "extents must be sorted, disjoint, non-empty and name a layer given");
            goto fail;
        }
        if (e.kind >= 0 && (plan->files[e.kind].fd < 0 || e.end > plan->files[e.kind].blocks))
            e.kind = KIND_DECLINE; /* no file open, or the file is too short: Python's path decides */
        plan->extents[i] = e;
        prev_end = e.end;
    }
    plan->nextents = n;
    PyBuffer_Release(&ext);

    pthread_mutex_lock(&self->lock);
    discard_locked(self, fh);
    if (self->ntable == self->cap) {
        size_t cap = self->cap ? 2 * self->cap : 16;
        Plan **table = PyMem_Realloc(self->table, cap * sizeof(Plan *));
        if (table == NULL) {
            pthread_mutex_unlock(&self->lock);
            plan_free(plan);
            bury_dead(self);
            return PyErr_NoMemory();
        }
        self->table = table;
        self->cap = cap;
    }
    self->table[self->ntable++] = plan;
    pthread_mutex_unlock(&self->lock);
    bury_dead(self);
    Py_RETURN_NONE;

fail:
    if (ext.obj != NULL)
        PyBuffer_Release(&ext);
    plan_free(plan);
    return NULL;
}

static PyObject *Server_discard(ServerObject *self, PyObject *arg)
{
    unsigned long long fh = PyLong_AsUnsignedLongLong(arg);
    if (fh == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    pthread_mutex_lock(&self->lock);
    int had = discard_locked(self, fh);
    pthread_mutex_unlock(&self->lock);
    bury_dead(self);
    return PyBool_FromLong(had);
}

static PyObject *Server_planned(ServerObject *self, PyObject *arg)
{
    unsigned long long fh = PyLong_AsUnsignedLongLong(arg);
    if (fh == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    pthread_mutex_lock(&self->lock);
    Py_ssize_t i = find_locked(self, fh);
    pthread_mutex_unlock(&self->lock);
    return PyBool_FromLong(i >= 0);
}

static PyObject *Server_plans(ServerObject *self, PyObject *unused)
{
    pthread_mutex_lock(&self->lock);
    size_t n = self->ntable;
    pthread_mutex_unlock(&self->lock);
    return PyLong_FromSize_t(n);
}

static PyObject *Server_start(ServerObject *self, PyObject *unused)
{
    __atomic_store_n(&self->stopped, 0, __ATOMIC_SEQ_CST);
    pthread_mutex_lock(&self->hint_lock); /* hints() serves again */
    self->hints_stopped = 0;
    pthread_mutex_unlock(&self->hint_lock);
    Py_RETURN_NONE;
}

static PyObject *Server_stop(ServerObject *self, PyObject *unused)
{
    __atomic_store_n(&self->stopped, 1, __ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}

static PyObject *Server_stop_hints(ServerObject *self, PyObject *unused)
{
    pthread_mutex_lock(&self->hint_lock);
    self->hints_stopped = 1;
    self->qlen = 0;
    pthread_cond_broadcast(&self->hint_cond);
    pthread_mutex_unlock(&self->hint_lock);
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------- local readahead */

static int registered_locked(ServerObject *self, int fd, uint64_t token)
{
    for (size_t i = 0; i < self->nfiles; i++)
        if (self->files[i].fd == fd && self->files[i].token == token)
            return 1;
    return 0;
}

static PyObject *Server_hint_file(ServerObject *self, PyObject *args)
{
    int fd;
    unsigned long long token;
    if (!PyArg_ParseTuple(args, "iK", &fd, &token))
        return NULL;
    if (fd < 0) {
        PyErr_SetString(PyExc_ValueError, "a file descriptor");
        return NULL;
    }
    pthread_mutex_lock(&self->hint_lock);
    if (self->nfiles == self->capfiles) {
        size_t cap = self->capfiles ? 2 * self->capfiles : 8;
        HintFile *files = PyMem_RawRealloc(self->files, cap * sizeof(HintFile));
        if (files == NULL) {
            pthread_mutex_unlock(&self->hint_lock);
            return PyErr_NoMemory();
        }
        self->files = files;
        self->capfiles = cap;
    }
    self->files[self->nfiles++] = (HintFile){fd, token};
    pthread_mutex_unlock(&self->hint_lock);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(Server_forget_hint_file_doc,
"forget_hint_file(fd, token) -> bool\n\n"
"Unregister the file *fd*, *token* (``hint_file``): its queued hints are dropped, and this returns\n"
"once the hint thread is not using it, so the caller may close it. Whether it was registered.");

static PyObject *Server_forget_hint_file(ServerObject *self, PyObject *args)
{
    int fd;
    unsigned long long token;
    if (!PyArg_ParseTuple(args, "iK", &fd, &token))
        return NULL;
    int had = 0;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&self->hint_lock);
    for (size_t i = 0; i < self->nfiles; i++)
        if (self->files[i].fd == fd && self->files[i].token == token) {
            self->files[i] = self->files[--self->nfiles];
            had = 1;
            break;
        }
    size_t kept = 0;
    for (size_t i = 0; i < self->qlen; i++) {
        Hint h = self->queue[(self->qhead + i) % HINT_QUEUE];
        if (!(h.fd == fd && h.token == token))
            self->queue[(self->qhead + kept++) % HINT_QUEUE] = h;
    }
    self->qlen = kept;
    while (self->busy.fd == fd && self->busy.token == token)
        pthread_cond_wait(&self->hint_cond, &self->hint_lock);
    pthread_mutex_unlock(&self->hint_lock);
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(had);
}

PyDoc_STRVAR(Server_hints_doc,
"hints() -> None\n\n"
"The hint thread's loop, with the GIL released: take each queued window and ask the kernel to\n"
"read it ahead (posix_fadvise WILLNEED on its registered file) until ``stop_hints``.");

static PyObject *Server_hints(ServerObject *self, PyObject *unused)
{
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&self->hint_lock);
    for (;;) {
        while (self->qlen == 0 && !self->hints_stopped)
            pthread_cond_wait(&self->hint_cond, &self->hint_lock);
        if (self->hints_stopped)
            break;
        Hint h = self->queue[self->qhead];
        self->qhead = (self->qhead + 1) % HINT_QUEUE;
        self->qlen--;
        if (!registered_locked(self, h.fd, h.token))
            continue;
        self->busy = (HintFile){h.fd, h.token};
        pthread_mutex_unlock(&self->hint_lock);
        for (uint64_t off = h.off; off < h.off + h.len; off += HINT_PIECE) {
            uint64_t n = h.off + h.len - off < HINT_PIECE ? h.off + h.len - off : HINT_PIECE;
            posix_fadvise(h.fd, (off_t)off, (off_t)n, POSIX_FADV_WILLNEED); /* a hint: errors change nothing */
        }
        pthread_mutex_lock(&self->hint_lock);
        self->hints_issued++;
        self->busy.fd = -1;
        pthread_cond_broadcast(&self->hint_cond);
    }
    pthread_mutex_unlock(&self->hint_lock);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *Server_hint_stats(ServerObject *self, PyObject *unused)
{
    pthread_mutex_lock(&self->hint_lock);
    size_t queued = self->qlen + (self->busy.fd >= 0), files = self->nfiles;
    unsigned long long dropped = self->hints_dropped, issued = self->hints_issued;
    pthread_mutex_unlock(&self->hint_lock);
    return Py_BuildValue("{s:n,s:n,s:K,s:K}", "queued", (Py_ssize_t)queued, "files", (Py_ssize_t)files,
                         "dropped", dropped, "issued", issued);
}

/* ------------------------------------------------------------- serving READs */

typedef struct {
    uint8_t *buf;
    size_t cap;
} Stage;

static int stage_reserve(Stage *s, size_t need)
{
    if (s->cap >= need)
        return 0;
    uint8_t *b = realloc(s->buf, need);
    if (b == NULL)
        return -1;
    s->buf = b;
    s->cap = need;
    return 0;
}

static int covered(const LayerFile *f, uint64_t start, uint64_t end)
{
    for (uint64_t b = start; b < end; b++) {
        uint8_t byte = __atomic_load_n(&f->bits[b >> 3], __ATOMIC_ACQUIRE);
        if (!(byte & (1u << (b & 7))))
            return 0;
    }
    return 1;
}

static int pread_full(int fd, uint8_t *buf, size_t len, uint64_t pos)
{
    size_t done = 0;
    while (done < len) {
        ssize_t r = pread(fd, buf + done, len - done, (off_t)(pos + done));
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        done += (size_t)r;
    }
    return 0;
}

static int hashes_match(const LayerFile *f, const uint8_t *data, uint64_t start, uint64_t end, uint32_t bs)
{
    for (uint64_t b = start; b < end; b++) {
        uint8_t out[HASH_LEN];
        blake3_hasher h;
        blake3_hasher_init(&h);
        blake3_hasher_update(&h, data + (b - start) * bs, bs);
        blake3_hasher_finalize(&h, out, HASH_LEN);
        if (memcmp(out, f->hashes + b * HASH_LEN, HASH_LEN) != 0)
            return 0;
    }
    return 1;
}

/* The index of the first extent that ends after block *first*. */
static size_t first_extent(const Plan *plan, uint64_t first)
{
    size_t lo = 0, hi = plan->nextents;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (plan->extents[mid].end <= first)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* Whether the plan would serve every block of [first, end) without declining (from its map only). */
static int local_range(const Plan *plan, uint64_t first, uint64_t end)
{
    for (size_t i = first_extent(plan, first); i < plan->nextents && plan->extents[i].start < end; i++) {
        const Extent *e = &plan->extents[i];
        if (e->kind == KIND_ZEROS)
            continue;
        if (e->kind < 0)
            return 0;
        if (!covered(&plan->files[e->kind], e->start > first ? e->start : first, e->end < end ? e->end : end))
            return 0;
    }
    return 1;
}

/* Count a READ in *counter* (saturating at 255): the READs counted before it. */
static unsigned count_read(uint8_t *counter)
{
    uint8_t old = __atomic_load_n(counter, __ATOMIC_RELAXED);
    while (old < 255 && !__atomic_compare_exchange_n(counter, &old, (uint8_t)(old + 1), 0, __ATOMIC_RELAXED,
                                                     __ATOMIC_RELAXED))
        ;
    return old;
}

/* After a READ of blocks [first, end) was answered: queue the readahead of each window it touched
 * that had hint_after READs before (one per 8 of its pages: it is being read densely), is not wholly
 * in this READ, and is all local (so the readahead never makes the daemon fetch). A queued window's
 * count starts again from 0: if its pages are evicted, it must be read densely again. So a reader
 * spread thin over a large file never has whole windows read for it, and at most one window is read
 * per hint_after READs in it. */
static void maybe_hint(ServerObject *self, Plan *plan, uint64_t first, uint64_t end)
{
    if (plan->window == 0)
        return;
    const uint64_t blocks = (plan->size + plan->block_size - 1) / plan->block_size;
    for (uint64_t w = first / plan->window; w <= (end - 1) / plan->window && w < plan->nwindows; w++) {
        uint64_t ws = w * plan->window, we = ws + plan->window < blocks ? ws + plan->window : blocks;
        if (count_read(&plan->seen[w]) < plan->hint_after)
            continue; /* too few READs in this window yet */
        if ((first <= ws && end >= we) || !local_range(plan, ws, we))
            continue;
        pthread_mutex_lock(&self->hint_lock);
        if (self->qlen < HINT_QUEUE && !self->hints_stopped && registered_locked(self, plan->hint_fd, plan->hint_token)) {
            self->queue[(self->qhead + self->qlen++) % HINT_QUEUE] =
                (Hint){plan->hint_fd, plan->hint_token, ws * plan->block_size, (we - ws) * plan->block_size};
            pthread_cond_signal(&self->hint_cond);
            ADD(plan->counters[0]->hints, 1);
            __atomic_store_n(&plan->seen[w], 0, __ATOMIC_RELAXED);
        } else {
            self->hints_dropped++; /* asked again by the window's next READ */
        }
        pthread_mutex_unlock(&self->hint_lock);
    }
}

/* Fill the stage with device blocks [first, end) as the plan serves them; 0, or -1 to decline. */
static int fill(const Plan *plan, uint8_t *data, uint64_t first, uint64_t end, uint64_t *blocks_read)
{
    const uint32_t bs = plan->block_size;
    const Extent *ext = plan->extents;
    uint64_t b = first;
    size_t i = first_extent(plan, first);
    while (b < end) {
        if (i >= plan->nextents || ext[i].start >= end) { /* a hole to the end: zeros */
            memset(data + (b - first) * bs, 0, (end - b) * bs);
            break;
        }
        if (ext[i].start > b) { /* a hole before the extent */
            memset(data + (b - first) * bs, 0, (ext[i].start - b) * bs);
            b = ext[i].start;
            continue;
        }
        int32_t kind = ext[i].kind;
        uint64_t stop = ext[i].end < end ? ext[i].end : end;
        if (kind == KIND_ZEROS) {
            memset(data + (b - first) * bs, 0, (stop - b) * bs);
        } else if (kind < 0) {
            return -1;
        } else {
            while (stop < end && i + 1 < plan->nextents && ext[i + 1].start == stop && ext[i + 1].kind == kind) {
                i++; /* the next extent continues the same layer file: one pread for both */
                stop = ext[i].end < end ? ext[i].end : end;
            }
            const LayerFile *f = &plan->files[kind];
            uint8_t *at = data + (b - first) * bs;
            if (!covered(f, b, stop) || pread_full(f->fd, at, (stop - b) * bs, b * bs) < 0 ||
                !hashes_match(f, at, b, stop, bs))
                return -1;
            *blocks_read += stop - b;
        }
        b = stop;
        i++;
    }
    return 0;
}

/* Answer the READ in req if the plans allow: 1 answered (or its answer refused), 0 declined. */
static int try_serve(ServerObject *self, int fd, const uint8_t *req, size_t n, Stage *stage)
{
    struct fuse_in_header ih;
    struct fuse_read_in ri;
    if (n < sizeof ih + sizeof ri)
        return 0;
    memcpy(&ih, req, sizeof ih);
    if (ih.opcode != FUSE_READ || ih.len != n || (ih.unique & UNIQUE_RESEND))
        return 0;
    memcpy(&ri, req + sizeof ih, sizeof ri);

    pthread_mutex_lock(&self->lock);
    Py_ssize_t k = find_locked(self, ri.fh);
    Plan *plan = k >= 0 ? self->table[k] : NULL;
    if (plan != NULL)
        plan->refs++;
    pthread_mutex_unlock(&self->lock);
    if (plan == NULL)
        return 0;
    CounterObject *c = plan->counters[0];
    ADD(c->inflight, 1);

    int answered = 0;
    if (ri.offset < plan->size && ri.size > 0) {
        uint64_t len = plan->size - ri.offset < ri.size ? plan->size - ri.offset : ri.size;
        uint64_t bs = plan->block_size;
        uint64_t first = ri.offset / bs, end = (ri.offset + len - 1) / bs + 1;
        uint64_t blocks = 0;
        if (stage_reserve(stage, (size_t)((end - first) * bs)) == 0 && fill(plan, stage->buf, first, end, &blocks) == 0) {
            struct fuse_out_header oh = {.len = (uint32_t)(sizeof oh + len), .error = 0, .unique = ih.unique};
            struct iovec iov[2] = {{&oh, sizeof oh}, {stage->buf + (ri.offset - first * bs), (size_t)len}};
            ssize_t w;
            do
                w = writev(fd, iov, 2);
            while (w < 0 && errno == EINTR);
            if (w < 0)
                ADD(c->reply_errors, 1); /* ENOENT: interrupted meanwhile; the request is gone either way */
            for (int i = 0; i < MAX_COUNTERS && plan->counters[i] != NULL; i++) {
                ADD(plan->counters[i]->reads, 1);
                ADD(plan->counters[i]->bytes, len);
                ADD(plan->counters[i]->blocks, blocks);
            }
            answered = 1;
            if (!(ri.flags & O_DIRECT)) /* an O_DIRECT reader (a direct-I/O loop) never reads the page cache */
                maybe_hint(self, plan, first, end);
        }
    }
    if (!answered)
        ADD(c->declined, 1);
    SUB(c->inflight, 1);
    pthread_mutex_lock(&self->lock);
    unref_locked(self, plan);
    pthread_mutex_unlock(&self->lock);
    return answered;
}

/* Read the next request into buf (holding the leader lock): its length, 0 when stopped, -errno. */
static ssize_t lead(ServerObject *self, int fd, int wake_fd, uint8_t *buf, size_t len)
{
    for (;;) {
        if (__atomic_load_n(&self->stopped, __ATOMIC_SEQ_CST))
            return 0;
        ssize_t r = read(fd, buf, len);
        if (r > 0)
            return r;
        if (r == 0)
            return -ENODEV;
        if (errno == EAGAIN) {
            struct pollfd p[2] = {{.fd = fd, .events = POLLIN}, {.fd = wake_fd, .events = POLLIN}};
            if (poll(p, 2, -1) < 0 && errno != EINTR)
                return -errno;
            continue;
        }
        if (errno == EINTR || errno == ENOENT) /* ENOENT: the request was interrupted meanwhile */
            continue;
        return -errno;
    }
}

PyDoc_STRVAR(Server_serve_doc,
"serve(fd, wake_fd, buf) -> int\n\n"
"Read requests from the FUSE connection *fd* into *buf* and answer the planned READs, with the\n"
"GIL released, until one needs Python: return its length (the request is in *buf*). 0 when\n"
"stopped (``stop``, then *wake_fd* readable), -errno when reading the connection failed.");

static PyObject *Server_serve(ServerObject *self, PyObject *args)
{
    int fd, wake_fd;
    Py_buffer buf;
    if (!PyArg_ParseTuple(args, "iiw*", &fd, &wake_fd, &buf))
        return NULL;
    Stage stage = {NULL, 0};
    ssize_t n;
    Py_BEGIN_ALLOW_THREADS
    for (;;) {
        pthread_mutex_lock(&self->leader);
        n = lead(self, fd, wake_fd, buf.buf, (size_t)buf.len);
        pthread_mutex_unlock(&self->leader);
        if (n <= 0 || !try_serve(self, fd, buf.buf, (size_t)n, &stage))
            break;
    }
    Py_END_ALLOW_THREADS
    free(stage.buf);
    PyBuffer_Release(&buf);
    bury_dead(self);
    return PyLong_FromSsize_t(n);
}

static PyMethodDef Server_methods[] = {
    {"add", (PyCFunction)Server_add, METH_VARARGS, Server_add_doc},
    {"discard", (PyCFunction)Server_discard, METH_O, "discard(fh) -> bool: drop fh's plan (reads in flight finish)"},
    {"planned", (PyCFunction)Server_planned, METH_O, "planned(fh) -> bool: whether fh has a plan"},
    {"plans", (PyCFunction)Server_plans, METH_NOARGS, "plans() -> int: the handles planned now"},
    {"serve", (PyCFunction)Server_serve, METH_VARARGS, Server_serve_doc},
    {"hint_file", (PyCFunction)Server_hint_file, METH_VARARGS,
     "hint_file(fd, token): hints may go through the open file *fd* (plans name it with *token*)"},
    {"forget_hint_file", (PyCFunction)Server_forget_hint_file, METH_VARARGS, Server_forget_hint_file_doc},
    {"hints", (PyCFunction)Server_hints, METH_NOARGS, Server_hints_doc},
    {"hint_stats", (PyCFunction)Server_hint_stats, METH_NOARGS,
     "hint_stats() -> dict: windows queued or being asked for now, files registered, hints dropped (queue "
     "full) and issued"},
    {"start", (PyCFunction)Server_start, METH_NOARGS, "start(): serve() reads requests again"},
    {"stop", (PyCFunction)Server_stop, METH_NOARGS, "stop(): serve() returns 0 once woken (write to its wake_fd)"},
    {"stop_hints", (PyCFunction)Server_stop_hints, METH_NOARGS,
     "stop_hints(): hints() returns once its current fadvise ends; queued windows are dropped"},
    {NULL},
};

static PyTypeObject ServerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "lazyfs.serve.fusekernel._fastread.Server",
    .tp_basicsize = sizeof(ServerObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The FUSE worker threads' READ path in C: plans per handle, and serve().",
    .tp_new = Server_new,
    .tp_dealloc = (destructor)Server_dealloc,
    .tp_methods = Server_methods,
};

/* ------------------------------------------------------------------- module */

static PyObject *block_hashes(PyObject *mod, PyObject *args)
{
    Py_buffer data;
    unsigned int bs;
    if (!PyArg_ParseTuple(args, "y*I", &data, &bs))
        return NULL;
    if (bs == 0 || data.len % bs != 0) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "data must be whole blocks");
        return NULL;
    }
    Py_ssize_t count = data.len / bs;
    PyObject *out = PyBytes_FromStringAndSize(NULL, count * HASH_LEN);
    if (out != NULL) {
        uint8_t *o = (uint8_t *)PyBytes_AS_STRING(out);
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < count; i++) {
            blake3_hasher h;
            blake3_hasher_init(&h);
            blake3_hasher_update(&h, (const uint8_t *)data.buf + i * bs, bs);
            blake3_hasher_finalize(&h, o + i * HASH_LEN, HASH_LEN);
        }
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&data);
    return out;
}

static PyMethodDef module_methods[] = {
    {"block_hashes", block_hashes, METH_VARARGS,
     "block_hashes(data, block_size) -> bytes: the blake3-128 of each block (the C path's hash, for tests)"},
    {NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastread", "The FUSE worker threads' READ path in C (fastread.c).", -1, module_methods,
};

PyMODINIT_FUNC PyInit__fastread(void)
{
    if (PyType_Ready(&CounterType) < 0 || PyType_Ready(&ServerType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&CounterType);
    Py_INCREF(&ServerType);
    if (PyModule_AddObject(m, "Counter", (PyObject *)&CounterType) < 0 ||
        PyModule_AddObject(m, "Server", (PyObject *)&ServerType) < 0 ||
        PyModule_AddIntConstant(m, "HASH_LEN", HASH_LEN) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
