/*
 * dwcp-workload: self-checking memory workload for DWCP live-migration tests.
 *
 * In the guest (no arguments) it reads its knobs from /proc/cmdline:
 *   dwcp.fill=MiB  dwcp.dirty=MiB/s  dwcp.mix=realistic|random|zero|text
 *   dwcp.seed=N    dwcp.hb_ms=N      dwcp.sweep_ms=N
 *   dwcp.hot=MiB   (rewrite only the first MiB of the fill: a hot set; 0 = all)
 * fills an anonymous mapping with deterministic, realistic page content,
 * then loops every 10 ms: rewrite the pages due at the dirty rate, verify a
 * slice of pages against a checksum table kept outside the fill area, and
 * print a heartbeat every hb_ms.  All output goes to stdout (the console).
 *
 * Page content is a pure function of (seed, page index, generation): the class
 * of a page and the source of a duplicate page depend only on (seed, index),
 * and the bytes of a page of generation g only on (seed, source index, g).
 *
 * Host-side modes (the binary is static, it runs on the host as well):
 *   --dump FILE     fill the area and write it to FILE (for lz4/zstd ratios)
 *   --selftest      fill, verify, dirty, verify, corrupt bytes, check that the
 *                   checker reports exactly the corrupted pages; exit 0 if OK
 *   --duration S    run the normal loop for S seconds, exit 1 on errors
 *   --cmdline STR   parse STR instead of /proc/cmdline
 *   --fill N --dirty N --mix M --seed N --hb-ms N --sweep-ms N  (overrides)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u
#define PAGE_WORDS (PAGE / 8u)
#define TICK_MS 10u
#define MIB (1024u * 1024u)
#define PAGES_PER_MIB (MIB / PAGE)
#define MAX_ERROR_LINES 1000u /* DWCP-ERROR lines printed at most; the count goes on */

/* Page classes. C_DUP pages are exact copies of a unique non-zero page. */
enum page_class { C_ZERO, C_TEXT, C_CODE, C_STRUCT, C_RANDOM, C_DUP, C_NCLASSES };
static const char *const class_names[C_NCLASSES] = {"zero", "text", "code", "struct", "random", "dup"};

enum mix { MIX_REALISTIC, MIX_RANDOM, MIX_ZERO, MIX_TEXT, MIX_CODE, MIX_STRUCT, MIX_N };
/* code and struct are extras (single-class areas, for measuring) */
static const char *const mix_names[MIX_N] = {"realistic", "random", "zero", "text", "code", "struct"};

struct config {
    uint64_t fill_mb;  /* 0 = default (half of MemTotal, leave 48 MiB free) */
    uint64_t dirty_mbps;
    uint64_t seed;
    uint64_t hb_ms;
    uint64_t sweep_ms; /* target time for one full verification sweep */
    int mix;
    uint64_t hot_mb;   /* 0 = the dirty cursor sweeps the whole fill */
};

/* Per-page bookkeeping, allocated separately from the fill area. */
struct page_info {
    uint64_t sum;     /* expected hash of the page */
    uint32_t src;     /* page whose content this page carries (itself unless C_DUP) */
    uint32_t gen;     /* generation of the content (of page src) */
    uint8_t cls;      /* enum page_class */
    uint8_t reported; /* mismatch already printed */
};

static struct config cfg = {0, 0, 1, 100, 3000, MIX_REALISTIC, 0};
static uint8_t *area;           /* the fill area */
static struct page_info *info;  /* checksum table etc. */
static uint64_t npages;
static uint8_t *code;           /* content of /bin/busybox (or a synthetic stand-in) */
static size_t code_len;
static uint64_t errors;         /* pages found corrupted */
static uint64_t error_lines;

/* ---------------------------------------------------------------- output */

/* printf to stdout with one write(2) per call, so lines are never split or
 * held in a buffer. */
static void out(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void out(const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n >= sizeof buf)
        n = sizeof buf - 1;
    const char *p = buf;
    while (n > 0) {
        ssize_t w = write(1, p, (size_t)n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return;
        p += w;
        n -= (int)w;
    }
}

static void die(const char *msg)
{
    out("DWCP-FATAL %s (errno=%d %s)\n", msg, errno, strerror(errno));
    exit(2);
}

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* ------------------------------------------------------- hashing, PRNG */

/* splitmix64 finaliser: a good 64-bit mixing function. */
static inline uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Key derived from (seed, a, b); used to seed per-page streams. */
static inline uint64_t key3(uint64_t a, uint64_t b, uint64_t salt)
{
    return mix64(cfg.seed * 0x9e3779b97f4a7c15ull ^ mix64(a * 0xd1b54a32d192ed03ull + mix64(b + salt)));
}

/* xorshift64*: fast PRNG stream; state must be non-zero. */
static inline uint64_t xs(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545f4914f6cdd1dull;
}

static inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

/* Page hash: FNV-1a style over 64-bit words, in 4 independent lanes (so it
 * runs at memory speed), lanes combined and finalised with mix64. Any change
 * of a single word always changes the result (each lane step is a bijection). */
static uint64_t page_hash(const uint8_t *page)
{
    const uint64_t P = 0x100000001b3ull;
    uint64_t h0 = 0xcbf29ce484222325ull, h1 = h0 ^ 1, h2 = h0 ^ 2, h3 = h0 ^ 3;
    const uint64_t *w = (const uint64_t *)(const void *)page;
    for (unsigned i = 0; i < PAGE_WORDS; i += 4) {
        h0 = (h0 ^ w[i + 0]) * P;
        h1 = (h1 ^ w[i + 1]) * P;
        h2 = (h2 ^ w[i + 2]) * P;
        h3 = (h3 ^ w[i + 3]) * P;
    }
    return mix64(h0 ^ rotl(h1, 17) ^ rotl(h2, 31) ^ rotl(h3, 47));
}

/* ------------------------------------------------------- page content */

static const char *const words[] = {
    "the", "of", "and", "to", "in", "a", "is", "that", "for", "it", "as", "was", "with", "be",
    "by", "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have",
    "an", "had", "they", "you", "were", "their", "one", "all", "we", "can", "her", "has",
    "there", "been", "if", "more", "when", "will", "would", "who", "so", "no", "memory",
    "migration", "page", "kernel", "network", "transfer", "source", "destination", "guest",
    "host", "virtual", "machine", "process", "system", "data", "time", "state", "device",
    "buffer", "packet", "stream", "channel", "latency", "bandwidth", "compression", "dirty",
    "bitmap", "round", "iteration", "converge", "downtime", "socket", "thread", "queue",
    "river", "mountain", "morning", "evening", "window", "garden", "history", "people",
    "government", "company", "number", "question", "problem", "service", "between",
    "important", "different", "following", "without", "another", "because", "through",
    "during", "before", "after", "against", "under", "around", "however", "several",
    "example", "general", "public", "report", "result", "market", "policy", "program",
    "develop", "provide", "include", "continue", "describe", "consider", "require",
    "remember", "understand", "information", "experience", "community", "development",
    "environment", "particular", "available", "necessary", "political", "economic",
    "national", "international", "social", "local", "small", "large", "early", "young",
    "quickly", "slowly", "carefully", "suddenly", "almost", "always", "never", "often",
    "perhaps", "rather", "quite", "still", "already", "together", "yesterday", "tomorrow",
    "London", "Paris", "Berlin", "Tuesday", "October", "Monday", "January", "Smith",
    "Johnson", "Brown", "Wilson", "Taylor", "Anderson", "Thomas", "Martin", "Garcia",
    "blue", "green", "yellow", "orange", "purple", "silver", "golden", "wooden", "broken",
    "ancient", "modern", "simple", "complex", "strange", "familiar", "careful", "honest",
    "walked", "talked", "opened", "closed", "started", "finished", "returned", "received",
    "believed", "wondered", "answered", "listened", "watched", "carried", "followed",
    "library", "hospital", "village", "station", "harbour", "kitchen", "office", "bridge",
    "letter", "message", "journey", "evidence", "decision", "attention", "direction",
    "surface", "pressure", "temperature", "energy", "material", "structure", "pattern",
    "function", "variable", "pointer", "address", "register", "interrupt", "schedule",
    "allocate", "release", "verify", "checksum", "integrity", "transaction",
};
#define NWORDS (sizeof words / sizeof words[0])

/* English-like text: words picked by the PRNG, sentences, punctuation,
 * occasional numbers and line breaks. */
static void gen_text(uint8_t *dst, uint64_t s)
{
    char buf[PAGE + 64];
    size_t pos = 0;
    int sentence_start = 1;
    while (pos < PAGE) {
        uint64_t r = xs(&s);
        if ((r & 63) == 0) { /* a number now and then */
            pos += (size_t)snprintf(buf + pos, 24, "%u", (unsigned)((r >> 8) % 100000u));
        } else {
            /* min of three draws: common (early) words are more frequent */
            uint64_t a = (r >> 8) % NWORDS, b = (r >> 20) % NWORDS, c = (r >> 50) % NWORDS;
            uint64_t m = a < b ? a : b;
            const char *w = words[m < c ? m : c];
            size_t len = strlen(w);
            memcpy(buf + pos, w, len);
            if (sentence_start && buf[pos] >= 'a' && buf[pos] <= 'z')
                buf[pos] = (char)(buf[pos] - 'a' + 'A');
            pos += len;
        }
        sentence_start = 0;
        unsigned p = (unsigned)((r >> 40) & 63);
        if (p < 4) {
            buf[pos++] = '.';
            buf[pos++] = p == 0 ? '\n' : ' ';
            sentence_start = 1;
        } else if (p < 8) {
            buf[pos++] = ',';
            buf[pos++] = ' ';
        } else {
            buf[pos++] = ' ';
        }
    }
    memcpy(dst, buf, PAGE);
}

/* Binary code: two 2 KiB chunks of /bin/busybox at PRNG offsets. */
static void gen_code(uint8_t *dst, uint64_t s)
{
    for (unsigned c = 0; c < 2; c++) {
        size_t off = (size_t)(xs(&s) % (code_len - 2048));
        memcpy(dst + c * 2048, code + off, 2048);
    }
}

/* Structured data: 64-byte records (think database rows or kernel objects)
 * with incrementing ids and timestamps, small values and a name field. */
struct record {
    uint32_t id;
    uint16_t kind;
    uint16_t flags;
    uint64_t ts_ns;
    uint32_t value;
    uint32_t owner;
    char name[24];
    uint64_t reserved[2];
};

static void gen_struct(uint8_t *dst, uint64_t s, uint64_t src, uint64_t gen)
{
    struct record *r = (struct record *)(void *)dst;
    uint32_t id = (uint32_t)(src * (PAGE / sizeof *r) + gen * 7919u);
    uint64_t ts = 1700000000000000000ull + src * 1000000000ull + gen * 10000000ull;
    memset(dst, 0, PAGE);
    for (unsigned i = 0; i < PAGE / sizeof *r; i++) {
        uint64_t x = xs(&s);
        ts += 1000000u + ((x & 7) << 10); /* ~1 ms apart, a little jitter */
        r[i].id = id + i;
        r[i].kind = (uint16_t)((x >> 20) & 3);
        r[i].flags = (uint16_t)((x >> 23) & 0x11);
        r[i].ts_ns = ts;
        r[i].value = (uint32_t)((x >> 32) % 100u);
        r[i].owner = 1000u + (uint32_t)((x >> 48) & 3);
        snprintf(r[i].name, sizeof r[i].name, "%s-%u", words[(x >> 52) % 16], (unsigned)((x >> 56) & 7));
    }
}

static void gen_random(uint8_t *dst, uint64_t s)
{
    uint64_t *w = (uint64_t *)(void *)dst;
    for (unsigned i = 0; i < PAGE_WORDS; i++)
        w[i] = xs(&s);
}

/* Bytes of page `src` at generation `gen` (class of src, never C_DUP). */
static void gen_content(uint8_t *dst, uint64_t src, uint64_t gen)
{
    uint64_t s = key3(src, gen, 0x5eed) | 1;
    switch (info[src].cls) {
    case C_TEXT: gen_text(dst, s); break;
    case C_CODE: gen_code(dst, s); break;
    case C_STRUCT: gen_struct(dst, s, src, gen); break;
    case C_RANDOM: gen_random(dst, s); break;
    default: memset(dst, 0, PAGE); break;
    }
}

/* Class of page idx from (seed, idx). Realistic mix: 15% zero; of the other
 * pages 1/3 are duplicates, 2/3 unique with text:code:struct:random =
 * 25:20:15:10. */
static uint8_t classify(uint64_t idx)
{
    switch (cfg.mix) {
    case MIX_RANDOM: return C_RANDOM;
    case MIX_ZERO: return C_ZERO;
    case MIX_TEXT: return C_TEXT;
    case MIX_CODE: return C_CODE;
    case MIX_STRUCT: return C_STRUCT;
    default: break;
    }
    uint64_t k = key3(idx, 0, 0xc1a55);
    if (k % 1000 < 150)
        return C_ZERO;
    if ((k >> 20) % 3 == 0)
        return C_DUP;
    unsigned w = (unsigned)((k >> 40) % 70);
    return w < 25 ? C_TEXT : w < 45 ? C_CODE : w < 60 ? C_STRUCT : C_RANDOM;
}

static void setup_classes(void)
{
    for (uint64_t i = 0; i < npages; i++) {
        info[i].cls = classify(i);
        info[i].src = (uint32_t)i;
        info[i].gen = 0;
        info[i].reported = 0;
    }
    /* Each duplicate copies a unique non-zero page chosen from (seed, idx):
     * a quarter of them a near one (within the 16 pages before, like a
     * copied buffer), the others one anywhere (shared libraries, page cache). */
    for (uint64_t i = 0; i < npages; i++) {
        if (info[i].cls != C_DUP)
            continue;
        uint64_t k = key3(i, 0, 0xd0b), j;
        if ((k & 3) == 0 && i >= 16) {
            for (j = i - 1 - ((k >> 8) % 8); j + 16 > i; j--)
                if (info[j].cls != C_DUP && info[j].cls != C_ZERO) {
                    info[i].src = (uint32_t)j;
                    break;
                }
            if (j + 16 > i)
                continue;
        }
        j = (k >> 16) % npages;
        unsigned tries = 0;
        while ((info[j].cls == C_DUP || info[j].cls == C_ZERO) && tries++ < 256)
            j = (j + 1) % npages;
        if (info[j].cls == C_DUP || info[j].cls == C_ZERO)
            info[i].cls = C_TEXT; /* tiny area: no candidate, make it unique */
        else
            info[i].src = (uint32_t)j;
    }
}

/* (Re)write page idx with generation gen of its own content or, for a
 * duplicate, with the current generation of its source page; record hash. */
static void write_page(uint64_t idx, uint32_t gen)
{
    uint8_t *p = area + idx * PAGE;
    if (info[idx].cls == C_DUP) {
        uint32_t src = info[idx].src;
        info[idx].gen = info[src].gen;
        gen_content(p, src, info[src].gen);
    } else {
        info[idx].gen = gen;
        gen_content(p, idx, gen);
    }
    info[idx].sum = page_hash(p);
}

/* Verify page idx against the table; report a mismatch once per page. */
static void check_page(uint64_t idx)
{
    uint64_t got = page_hash(area + idx * PAGE);
    if (got == info[idx].sum || info[idx].reported)
        return;
    info[idx].reported = 1;
    errors++;
    if (error_lines++ < MAX_ERROR_LINES)
        out("DWCP-ERROR page=%llu expected=%016llx got=%016llx\n", (unsigned long long)idx,
            (unsigned long long)info[idx].sum, (unsigned long long)got);
    else if (error_lines == MAX_ERROR_LINES + 1)
        out("DWCP-ERROR-SUPPRESSED further DWCP-ERROR lines are not printed\n");
}

/* ---------------------------------------------------------------- setup */

static void load_code(void)
{
    int fd = open("/bin/busybox", O_RDONLY);
    if (fd >= 0) {
        off_t len = lseek(fd, 0, SEEK_END);
        if (len > 65536) {
            code = malloc((size_t)len);
            if (code && pread(fd, code, (size_t)len, 0) == len) {
                code_len = (size_t)len;
                close(fd);
                return;
            }
            free(code);
        }
        close(fd);
    }
    /* Fallback: synthetic "machine code" (bytes from a small opcode-like set). */
    code_len = 1u << 20;
    code = malloc(code_len);
    if (!code)
        die("malloc code");
    uint64_t s = 0x123456789ull;
    for (size_t i = 0; i < code_len; i++) {
        uint64_t r = xs(&s);
        code[i] = (r & 3) ? (uint8_t)(0x40 + ((r >> 8) & 0x4f)) : (uint8_t)(r >> 16);
    }
    out("DWCP-WARN /bin/busybox unreadable, using synthetic code pages\n");
}

/* Value of "Key:  N kB" from /proc/meminfo in MiB, or 0. */
static uint64_t meminfo_mb(const char *keyname)
{
    FILE *f = fopen("/proc/meminfo", "r");
    char line[256];
    uint64_t v = 0;
    size_t kl = strlen(keyname);
    if (!f)
        return 0;
    while (fgets(line, sizeof line, f))
        if (strncmp(line, keyname, kl) == 0 && line[kl] == ':') {
            v = strtoull(line + kl + 1, NULL, 10) / 1024u;
            break;
        }
    fclose(f);
    return v;
}

static int parse_mix(const char *s, size_t len)
{
    for (int i = 0; i < MIX_N; i++)
        if (strlen(mix_names[i]) == len && strncmp(s, mix_names[i], len) == 0)
            return i;
    out("DWCP-WARN unknown dwcp.mix '%.*s', using realistic\n", (int)len, s);
    return MIX_REALISTIC;
}

/* Parse dwcp.* knobs from a kernel-style command line. */
static void parse_cmdline(const char *cl)
{
    const char *p = cl;
    while (*p) {
        while (*p == ' ' || *p == '\n' || *p == '\t')
            p++;
        const char *tok = p;
        while (*p && *p != ' ' && *p != '\n' && *p != '\t')
            p++;
        size_t len = (size_t)(p - tok);
        const char *eq = memchr(tok, '=', len);
        if (len < 6 || strncmp(tok, "dwcp.", 5) != 0 || !eq)
            continue;
        const char *name = tok + 5, *val = eq + 1;
        size_t nlen = (size_t)(eq - name), vlen = (size_t)(p - val);
        uint64_t num = strtoull(val, NULL, 10);
#define IS(s) (nlen == strlen(s) && strncmp(name, s, nlen) == 0)
        if (IS("fill")) cfg.fill_mb = num;
        else if (IS("dirty")) cfg.dirty_mbps = num;
        else if (IS("seed")) cfg.seed = num;
        else if (IS("hb_ms")) cfg.hb_ms = num ? num : 100;
        else if (IS("sweep_ms")) cfg.sweep_ms = num ? num : 3000;
        else if (IS("mix")) cfg.mix = parse_mix(val, vlen);
        else if (IS("hot")) cfg.hot_mb = num;
        else out("DWCP-WARN unknown knob %.*s\n", (int)len, tok);
#undef IS
    }
}

static void read_proc_cmdline(void)
{
    char buf[4096];
    int fd = open("/proc/cmdline", O_RDONLY);
    if (fd < 0)
        return;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n > 0) {
        buf[n] = 0;
        parse_cmdline(buf);
    }
}

/* Default fill = 50% of MemTotal; always leave >= 48 MiB available. */
static void choose_fill(void)
{
    uint64_t total = meminfo_mb("MemTotal");
    uint64_t avail = meminfo_mb("MemAvailable");
    if (!avail)
        avail = meminfo_mb("MemFree");
    uint64_t cap = avail > 48 + 8 ? avail - 48 : 8;
    if (!cfg.fill_mb) {
        cfg.fill_mb = total / 2;
        if (cfg.fill_mb > cap)
            cfg.fill_mb = cap;
    } else if (avail && cfg.fill_mb > cap) {
        out("DWCP-WARN dwcp.fill=%llu leaves < 48 MiB free, using %llu\n",
            (unsigned long long)cfg.fill_mb, (unsigned long long)cap);
        cfg.fill_mb = cap;
    }
    if (!cfg.fill_mb)
        cfg.fill_mb = 1;
}

static void alloc_and_fill(void)
{
    npages = cfg.fill_mb * PAGES_PER_MIB;
    area = mmap(NULL, npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (area == MAP_FAILED)
        die("mmap fill area");
    info = mmap(NULL, npages * sizeof *info, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (info == MAP_FAILED)
        die("mmap page table");
    setup_classes();
    /* Unique pages first, then duplicates (their sources must exist). */
    for (uint64_t i = 0; i < npages; i++)
        if (info[i].cls != C_DUP)
            write_page(i, 0);
    for (uint64_t i = 0; i < npages; i++)
        if (info[i].cls == C_DUP)
            write_page(i, 0);
}

static void class_stats(char *buf, size_t len)
{
    uint64_t n[C_NCLASSES] = {0};
    for (uint64_t i = 0; i < npages; i++)
        n[info[i].cls]++;
    size_t pos = 0;
    for (int c = 0; c < C_NCLASSES && pos < len; c++)
        pos += (size_t)snprintf(buf + pos, len - pos, "%s%s=%llu", c ? " " : "", class_names[c],
                                (unsigned long long)n[c]);
}

/* ---------------------------------------------------------------- loop */

static uint64_t dirty_cursor, check_cursor, dirtied_pages, sweeps;

static void dirty_pages(uint64_t n)
{
    uint64_t wrap = npages;
    if (cfg.hot_mb && cfg.hot_mb * PAGES_PER_MIB < npages)
        wrap = cfg.hot_mb * PAGES_PER_MIB;
    for (uint64_t k = 0; k < n; k++) {
        uint64_t i = dirty_cursor;
        write_page(i, info[i].gen + 1);
        if (++dirty_cursor >= wrap)
            dirty_cursor = 0;
    }
    dirtied_pages += n;
}

static void check_pages(uint64_t n)
{
    for (uint64_t k = 0; k < n; k++) {
        check_page(check_cursor);
        if (++check_cursor == npages) {
            check_cursor = 0;
            sweeps++;
        }
    }
}

/* Main loop; duration_s = 0 means forever. Returns the error count. */
static uint64_t run(uint64_t duration_s)
{
    const uint64_t pps = cfg.dirty_mbps * PAGES_PER_MIB;   /* pages/s to rewrite */
    const uint64_t max_backlog = pps / 10 + 1;              /* drop lag beyond 100 ms */
    uint64_t per_tick = (npages * TICK_MS + cfg.sweep_ms - 1) / cfg.sweep_ms;
    if (!per_tick)
        per_tick = 1;
    uint64_t t0 = now_ms(), next_hb = t0, seq = 0, due_base = t0, due_done = 0;
    struct timespec next_tick;
    clock_gettime(CLOCK_MONOTONIC, &next_tick);
    for (;;) {
        uint64_t t = now_ms();
        if (pps) {
            uint64_t due = (t - due_base) * pps / 1000u;
            if (due > due_done + max_backlog) { /* could not keep up (or clock jump) */
                due_base = t;
                due_done = 0;
                due = max_backlog;
            }
            if (due > due_done) {
                dirty_pages(due - due_done);
                due_done = due;
            }
        }
        check_pages(per_tick);
        t = now_ms();
        if (t >= next_hb) {
            out("DWCP-HB seq=%llu t_ms=%llu dirtied_mb=%llu swept=%llu errors=%llu\n",
                (unsigned long long)seq++, (unsigned long long)t,
                (unsigned long long)(dirtied_pages / PAGES_PER_MIB), (unsigned long long)sweeps,
                (unsigned long long)errors);
            next_hb += cfg.hb_ms;
            if (next_hb <= t)
                next_hb = t + cfg.hb_ms;
        }
        if (duration_s && t - t0 >= duration_s * 1000u)
            return errors;
        next_tick.tv_nsec += TICK_MS * 1000000L;
        if (next_tick.tv_nsec >= 1000000000L) {
            next_tick.tv_nsec -= 1000000000L;
            next_tick.tv_sec++;
        }
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (now.tv_sec > next_tick.tv_sec + 1) /* far behind: do not try to catch up */
            next_tick = now;
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next_tick, NULL);
    }
}

/* ------------------------------------------------------------ host modes */

static int dump(const char *path)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0)
        die("open dump file");
    for (uint64_t off = 0; off < npages * PAGE;) {
        ssize_t w = write(fd, area + off, npages * PAGE - off);
        if (w <= 0)
            die("write dump file");
        off += (uint64_t)w;
    }
    close(fd);
    out("DWCP-DUMP file=%s bytes=%llu\n", path, (unsigned long long)(npages * PAGE));
    return 0;
}

#define ST_FAIL(...) do { out("SELFTEST FAIL: " __VA_ARGS__); return 1; } while (0)

/* Every page must equal a fresh generation of (src, gen) and hash to its sum;
 * duplicates must be byte-identical to their source when generations match. */
static int selftest_consistency(const char *stage)
{
    static uint8_t tmp[PAGE];
    for (uint64_t i = 0; i < npages; i++) {
        gen_content(tmp, info[i].src, info[i].gen);
        if (memcmp(tmp, area + i * PAGE, PAGE) != 0 || page_hash(tmp) != info[i].sum)
            ST_FAIL("%s: page %llu not reproducible from (seed, src, gen)\n", stage, (unsigned long long)i);
        uint32_t s = info[i].src;
        if (info[i].cls == C_DUP && info[s].gen == info[i].gen &&
            memcmp(area + i * PAGE, area + (uint64_t)s * PAGE, PAGE) != 0)
            ST_FAIL("%s: dup page %llu differs from source %u\n", stage, (unsigned long long)i, s);
    }
    return 0;
}

static int selftest(void)
{
    char stats[256];
    class_stats(stats, sizeof stats);
    out("SELFTEST fill_mb=%llu pages=%llu %s\n", (unsigned long long)cfg.fill_mb,
        (unsigned long long)npages, stats);
    if (selftest_consistency("after fill"))
        return 1;
    check_pages(npages);
    if (errors)
        ST_FAIL("clean area reported %llu errors\n", (unsigned long long)errors);

    /* Dirty 2.5 sweeps' worth of pages, verify everything again. */
    dirty_pages(npages * 5 / 2);
    if (selftest_consistency("after dirtying"))
        return 1;
    check_pages(npages);
    if (errors)
        ST_FAIL("dirtied area reported %llu errors\n", (unsigned long long)errors);

    /* Corrupt one byte in a zero page, a text page, a dup page and the last
     * page; the checker must report exactly these four, once each. */
    uint64_t victims[4] = {npages, npages, npages, npages - 1};
    for (uint64_t i = 0; i + 1 < npages; i++) {
        if (info[i].cls == C_ZERO && victims[0] == npages) victims[0] = i;
        if (info[i].cls == C_TEXT && victims[1] == npages) victims[1] = i;
        if (info[i].cls == C_DUP && victims[2] == npages) victims[2] = i;
    }
    uint64_t expect = 0;
    for (int v = 0; v < 4; v++) {
        if (victims[v] == npages)
            continue; /* class absent in this mix */
        int dupe = 0;
        for (int u = 0; u < v; u++)
            dupe |= victims[u] == victims[v];
        if (dupe)
            continue;
        area[victims[v] * PAGE + 1234 + (unsigned)v] ^= 0x20; /* flip one bit */
        expect++;
        out("SELFTEST corrupting page %llu (%s)\n", (unsigned long long)victims[v], class_names[info[victims[v]].cls]);
    }
    check_pages(npages);
    if (errors != expect)
        ST_FAIL("expected %llu errors after corruption, got %llu\n", (unsigned long long)expect,
                (unsigned long long)errors);
    check_pages(npages); /* second sweep must not re-report */
    if (errors != expect)
        ST_FAIL("errors re-reported: %llu\n", (unsigned long long)errors);
    out("SELFTEST OK: clean fill and dirtied area verified, %llu/%llu corrupted pages detected\n",
        (unsigned long long)errors, (unsigned long long)expect);
    return 0;
}

static void usage(void)
{
    out("usage: dwcp-workload [--cmdline STR] [--fill MiB] [--dirty MiB/s] [--hot MiB] [--mix M] [--seed N]\n"
        "                     [--hb-ms N] [--sweep-ms N] [--dump FILE | --selftest | --duration S]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    const char *dump_path = NULL;
    int do_selftest = 0, have_cmdline = 0;
    uint64_t duration = 0;
    struct config over = {0, ~0ull, ~0ull, 0, 0, -1, ~0ull};

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--selftest")) { do_selftest = 1; continue; }
        if (!v)
            usage();
        i++;
        if (!strcmp(a, "--dump")) dump_path = v;
        else if (!strcmp(a, "--cmdline")) { parse_cmdline(v); have_cmdline = 1; }
        else if (!strcmp(a, "--fill")) over.fill_mb = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--dirty")) over.dirty_mbps = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--seed")) over.seed = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--hb-ms")) over.hb_ms = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--sweep-ms")) over.sweep_ms = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--mix")) over.mix = parse_mix(v, strlen(v));
        else if (!strcmp(a, "--hot")) over.hot_mb = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--duration")) duration = strtoull(v, NULL, 10);
        else usage();
    }
    int host_mode = dump_path || do_selftest || duration || have_cmdline;
    if (!host_mode)
        read_proc_cmdline();
    if (over.fill_mb) cfg.fill_mb = over.fill_mb;
    if (over.dirty_mbps != ~0ull) cfg.dirty_mbps = over.dirty_mbps;
    if (over.seed != ~0ull) cfg.seed = over.seed;
    if (over.hb_ms) cfg.hb_ms = over.hb_ms;
    if (over.sweep_ms) cfg.sweep_ms = over.sweep_ms;
    if (over.mix >= 0) cfg.mix = over.mix;
    if (over.hot_mb != ~0ull) cfg.hot_mb = over.hot_mb;
    if (do_selftest && !cfg.fill_mb)
        cfg.fill_mb = 8;
    choose_fill();

    load_code();
    uint64_t t0 = now_ms();
    out("DWCP-FILLING fill_mb=%llu seed=%llu mix=%s\n", (unsigned long long)cfg.fill_mb,
        (unsigned long long)cfg.seed, mix_names[cfg.mix]);
    alloc_and_fill();
    uint64_t fill_ms = now_ms() - t0;

    if (dump_path)
        return dump(dump_path);
    if (do_selftest)
        return selftest();

    char stats[256];
    class_stats(stats, sizeof stats);
    out("DWCP-READY fill_mb=%llu pages=%llu mix=%s dirty=%llu seed=%llu hb_ms=%llu fill_ms=%llu %s\n",
        (unsigned long long)cfg.fill_mb, (unsigned long long)npages, mix_names[cfg.mix],
        (unsigned long long)cfg.dirty_mbps, (unsigned long long)cfg.seed,
        (unsigned long long)cfg.hb_ms, (unsigned long long)fill_ms, stats);
    return run(duration) ? 1 : 0;
}
