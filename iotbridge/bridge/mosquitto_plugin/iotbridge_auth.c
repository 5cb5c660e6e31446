/* iotbridge_auth: Mosquitto 2.0 (plugin interface 5) authenticating IoT Core devices itself, with the auth daemon
 * (iotbridge/bridge/authd.py) beside it on the host ("device_auth: mosquitto", docs/broker-scaling.md).
 * Built by iotbridge/bridge/plugin.py (never committed compiled).
 *
 * Options: plugin_opt_client_id_prefix (projects/P/locations/L/registries/R/devices/), plugin_opt_socket (the
 * daemon's Unix socket), plugin_opt_events_max_bytes, plugin_opt_state_max_bytes (the front's payload limits),
 * plugin_opt_internal_address (the address the host's own clients come from: the loopback listener's).
 *
 * Device clients (client id PREFIX + a device id) are judged here and only here: every answer for them is final
 * (never DEFER), so neither the password file, the ACL file nor the dynamic security plugin ever judges one. Every
 * other client is refused unless it comes from the internal address, and DEFERred then, so the host's internal
 * users keep their own mechanisms, are never judged here, and cannot log in from elsewhere: Mosquitto 2.0.11 tells
 * a plugin neither a client's listener nor runs MOSQ_EVT_TICK with per_listener_settings true (src/plugin.c), so
 * the device listener cannot have security settings of its own; a client on it from the network never has the
 * loopback address (the kernel drops such packets from outside), and one from the host itself could as well use
 * the loopback listener.
 *
 * MOSQ_EVT_BASIC_AUTH: one request on the auth connection (blocking, reconnected on failure; a failure refuses the
 *   CONNECT): "AUTH <request id> <client id>\n<peer address>\n<password>\n", answered "<request id> OK <deadline>
 *   <session id>\n" (unix seconds; the daemon's id of the session) or "<request id> NO <reason>\n". The username is
 *   ignored. At most AUTH_TIMEOUT_MS of Mosquitto's thread: no answer by then refuses the CONNECT, and every CONNECT
 *   of the next second at once, without asking again; the late answer is recognized by its request id and dropped
 *   (a GONE tells the daemon if it admitted). A persistent session (clean session/start false) is refused.
 * MOSQ_EVT_ACL_CHECK: a device publishes /devices/ID/events[/...] (at most events_max_bytes) and /devices/ID/state
 *   (at most state_max_bytes), QoS <= 1, never retained; subscribes to /devices/ID/config, /devices/ID/commands,
 *   /devices/ID/commands/# and a commands sub-folder (with or without /#); receives only those. Its SUBSCRIBE to
 *   its config sends "SUBSCRIBED <session id>\n" (the daemon asks the bridge service for the config).
 * MOSQ_EVT_DISCONNECT: "GONE <session id>\n" on the events connection, once per admitted CONNECT.
 * MOSQ_EVT_TICK: the events connection is (re)connected: "EVENTS <highest session id given so far>\n", then
 *   "LIVE <session id> <deadline> <client id>\n" for every admitted session, streamed a part a tick as the daemon
 *   reads, and "SYNCED\n" (the daemon reconciles its sessions with these, by session id); "KICK <session id>\n"
 *   lines from the daemon end that session, if Mosquitto still holds it, without its will; a session whose
 *   deadline passed is ended the same way.
 */
#define _GNU_SOURCE /* memrchr */
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

#define BUCKETS 65536
#define OUT_MAX (256 * 1024 * 1024) /* only a daemon that stopped reading reaches it: the connection starts over */
#define LIVE_CHUNK (256 * 1024)     /* LIVE lines queued at a time */
#define IN_MAX 4096
#define ANSWER_MAX 512
#define AUTH_TIMEOUT_MS 1000
#define AUTH_REFUSE_MS 1000 /* after a timeout */

static mosquitto_plugin_id_t *plugin_id;
static char prefix[512];
static size_t prefix_len;
static char sock_path[108];
static char internal_address[64] = "127.0.0.1";
static uint32_t events_max = 256 * 1024;
static uint32_t state_max = 64 * 1024;
static int auth_fd = -1;
static int events_fd = -1;
static time_t last_scan;
static time_t last_connect_try;

/* ------------------------------------------------------------------------------------- admitted sessions */

/* One admitted CONNECT, in three chains: by the client (Mosquitto's handle), by the daemon's session id, and by the
 * client id (whose newest session is the one Mosquitto holds). */
struct session {
    struct session *by_client, *by_sid, *by_id;
    const struct mosquitto *client;
    char *id;
    unsigned long long sid; /* the daemon's session id, from its OK */
    time_t deadline;
    uint64_t seq; /* admission order: the newest session of a client id is the one Mosquitto keeps */
    bool kicked;
};
static struct session *by_client[BUCKETS], *by_sid[BUCKETS], *by_id[BUCKETS];
static uint64_t next_seq;
static size_t session_count;
static unsigned long long max_sid; /* the highest session id the daemon gave (the EVENTS line says it) */

static unsigned client_slot(const struct mosquitto *client)
{
    uintptr_t p = (uintptr_t)client;
    return (unsigned)((p >> 4) ^ (p >> 20)) % BUCKETS;
}

static unsigned sid_slot(unsigned long long sid)
{
    return (unsigned)(sid % BUCKETS);
}

static unsigned id_slot(const char *id)
{
    uint32_t h = 2166136261u; /* FNV-1a */
    for (const unsigned char *p = (const unsigned char *)id; *p; p++) h = (h ^ *p) * 16777619u;
    return h % BUCKETS;
}

/* False when out of memory: the CONNECT is then refused (an untracked session would never be ended). */
static bool session_add(const struct mosquitto *client, const char *id, unsigned long long sid, time_t deadline)
{
    struct session *s = mosquitto_calloc(1, sizeof *s);
    if (!s) return false;
    s->id = mosquitto_strdup(id);
    if (!s->id) {
        mosquitto_free(s);
        return false;
    }
    s->client = client;
    s->sid = sid;
    s->deadline = deadline;
    s->seq = ++next_seq;
    unsigned c = client_slot(client), k = sid_slot(sid), i = id_slot(id);
    s->by_client = by_client[c];
    by_client[c] = s;
    s->by_sid = by_sid[k];
    by_sid[k] = s;
    s->by_id = by_id[i];
    by_id[i] = s;
    session_count++;
    return true;
}

static struct session *session_of(const struct mosquitto *client)
{
    for (struct session *s = by_client[client_slot(client)]; s; s = s->by_client)
        if (s->client == client) return s;
    return NULL;
}

static struct session *session_by_sid(unsigned long long sid)
{
    for (struct session *s = by_sid[sid_slot(sid)]; s; s = s->by_sid)
        if (s->sid == sid) return s;
    return NULL;
}

/* The session of this CONNECT, unlinked from its three chains; NULL when the plugin did not admit it. */
static struct session *session_take(const struct mosquitto *client)
{
    struct session *s = session_of(client);
    if (!s) return NULL;
    struct session **p;
    for (p = &by_client[client_slot(client)]; *p != s; p = &(*p)->by_client) {}
    *p = s->by_client;
    for (p = &by_sid[sid_slot(s->sid)]; *p != s; p = &(*p)->by_sid) {}
    *p = s->by_sid;
    for (p = &by_id[id_slot(s->id)]; *p != s; p = &(*p)->by_id) {}
    *p = s->by_id;
    session_count--;
    return s;
}

/* Whether a session admitted after s holds the same client id (then Mosquitto keeps that one, not s): one chain. */
static bool superseded(const struct session *s)
{
    for (const struct session *o = by_id[id_slot(s->id)]; o; o = o->by_id)
        if (o->seq > s->seq && strcmp(o->id, s->id) == 0) return true;
    return false;
}

/* ----------------------------------------------------------------------------------------- the client id */

/* The device id of a client id PREFIX + ID, or NULL; the id as the registry's DEVICE_ID_RE: a letter, then 2 to
 * 254 of letters, digits and _ . ~ % - */
static const char *device_of(const char *client_id)
{
    if (!client_id || strncmp(client_id, prefix, prefix_len) != 0) return NULL;
    return client_id + prefix_len;
}

static bool valid_device_id(const char *id)
{
    size_t n = strlen(id);
    if (n < 3 || n > 255 || !isalpha((unsigned char)id[0])) return false;
    for (size_t i = 1; i < n; i++) {
        unsigned char c = (unsigned char)id[i];
        if (!isalnum(c) && !strchr("_.~%-", c)) return false;
    }
    return true;
}

/* --------------------------------------------------------------------------------------- the daemon link */

static int daemon_connect(bool blocking)
{
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    memcpy(addr.sun_path, sock_path, sizeof sock_path); /* both 108 bytes, sock_path NUL-terminated */
    struct timeval tv = {.tv_sec = 1};
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        close(fd);
        return -1;
    }
    if (!blocking) fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    return fd;
}

static bool write_all(int fd, const char *p, size_t n)
{
    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return false;
        p += w;
        n -= (size_t)w;
    }
    return true;
}

static void events_line(const char *verb, const char *arg);

/* The auth connection's answers, read line by line; a line longer than ANSWER_MAX is skipped to its newline. */
static char auth_in[ANSWER_MAX];
static size_t auth_len;
static bool auth_skipping;
static unsigned long long next_rid;
static long long auth_refuse_until; /* after a timeout, CONNECTs are refused at once until then (monotonic ms) */

static void auth_close(void)
{
    if (auth_fd >= 0) close(auth_fd);
    auth_fd = -1;
    auth_len = 0;
    auth_skipping = false;
}

/* A late answer (to a request already refused for its timeout) is dropped; if it admitted, the daemon is told the
 * session is gone, so that it holds no session Mosquitto never had. */
static const char *digits_then(const char *p, char after)
{
    if (!isdigit((unsigned char)*p)) return NULL;
    while (isdigit((unsigned char)*p)) p++;
    return *p == after ? p : NULL;
}

static void late_answer(const char *line)
{
    /* exactly "<rid> OK <deadline> <sid>": a refusal's reason may quote the device's own text, " OK " included */
    const char *p = digits_then(line, ' ');
    if (!p || strncmp(p, " OK ", 4) != 0) return;
    const char *sid = digits_then(p + 4, ' ');
    if (!sid || !digits_then(sid + 1, '\0')) return;
    events_line("GONE", sid + 1);
}

/* The next complete answer line in auth_in (NUL-terminated, newline removed), or NULL; consumed by auth_pop. */
static size_t auth_line_len;
static char *auth_peek(void)
{
    for (;;) {
        char *nl = memchr(auth_in, '\n', auth_len);
        if (!nl) {
            if (auth_len == sizeof auth_in) { /* longer than any answer we use: skip it to its newline */
                auth_skipping = true;
                auth_len = 0;
            }
            return NULL;
        }
        size_t n = (size_t)(nl - auth_in) + 1;
        if (auth_skipping) {
            auth_skipping = false;
            auth_len -= n;
            memmove(auth_in, auth_in + n, auth_len);
            continue;
        }
        *nl = '\0';
        auth_line_len = n;
        return auth_in;
    }
}

static void auth_pop(void)
{
    auth_len -= auth_line_len;
    memmove(auth_in, auth_in + auth_line_len, auth_len);
}

static long long now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

enum ask { ASK_ANSWERED, ASK_TIMEOUT, ASK_FAILED };

/* One AUTH request and its answer (copied without its request id into answer). The daemon is asked again (once,
 * on a new connection) only when the connection failed; never after a timeout, which costs Mosquitto's thread
 * at most AUTH_TIMEOUT_MS: the answer that comes later is discarded by its request id. */
static enum ask daemon_ask(const char *client_id, const char *address, const char *password, char *answer,
                           size_t cap)
{
    unsigned long long rid = ++next_rid;
    size_t n = 5 + 21 + 1 + strlen(client_id) + 1 + strlen(address) + 1 + strlen(password) + 1;
    char *req = mosquitto_malloc(n + 1);
    if (!req) return ASK_FAILED;
    n = (size_t)snprintf(req, n + 1, "AUTH %llu %s\n%s\n%s\n", rid, client_id, address, password);
    enum ask result = ASK_FAILED;
    long long t0 = now_ms();
    for (int attempt = 0; attempt < 2 && result == ASK_FAILED; attempt++) {
        if (auth_fd < 0 && (auth_fd = daemon_connect(true)) < 0) break;
        if (!write_all(auth_fd, req, n)) {
            bool stalled = errno == EAGAIN || errno == EWOULDBLOCK; /* SO_SNDTIMEO: the daemon reads nothing */
            auth_close();
            if (stalled) {
                result = ASK_TIMEOUT;
                break;
            }
            continue;
        }
        for (;;) {
            char *line;
            while ((line = auth_peek()) != NULL) {
                char *end;
                unsigned long long got = strtoull(line, &end, 10);
                if (got == rid && *end == ' ') {
                    snprintf(answer, cap, "%s", end + 1);
                    auth_pop();
                    result = ASK_ANSWERED;
                    break;
                }
                late_answer(line);
                auth_pop();
            }
            if (result == ASK_ANSWERED) break;
            long long left = AUTH_TIMEOUT_MS - (now_ms() - t0);
            struct pollfd p = {.fd = auth_fd, .events = POLLIN};
            int ready = left > 0 ? poll(&p, 1, (int)left) : 0;
            if (ready < 0 && errno == EINTR) continue;
            if (ready == 0) {
                result = ASK_TIMEOUT;
                break;
            }
            ssize_t r = ready > 0 ? read(auth_fd, auth_in + auth_len, sizeof auth_in - auth_len) : -1;
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) {
                auth_close();
                break;
            }
            auth_len += (size_t)r;
        }
    }
    mosquitto_free(req);
    return result;
}

/* The events connection, used only on the tick (never inside another event: a kick there runs the DISCONNECT event
 * at once). Its output is written without blocking Mosquitto (what the socket does not take waits here); the LIVE
 * list is streamed a part a tick, as fast as the daemon reads it, so no session count makes it too long. */
static char *out_buf;
static size_t out_len, out_cap;
static char in_buf[IN_MAX];
static size_t in_len;
static bool events_reset; /* the output outgrew OUT_MAX (the daemon stopped reading): the next tick starts over */
static long live_cursor = -1; /* the next bucket of the LIVE list; -1: not streaming */

static void events_close(void)
{
    if (events_fd >= 0) close(events_fd);
    events_fd = -1;
    out_len = 0; /* what was not sent is replaced by the LIVE list of the next connection */
    in_len = 0;
    live_cursor = -1;
}

static void events_flush(void)
{
    while (events_fd >= 0 && out_len) {
        ssize_t w = send(events_fd, out_buf, out_len, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
        if (w <= 0) {
            events_close();
            return;
        }
        memmove(out_buf, out_buf + w, out_len - (size_t)w);
        out_len -= (size_t)w;
    }
}

static void events_append(const char *text, size_t n)
{
    if (events_fd < 0 || events_reset) return;
    if (out_len + n > OUT_MAX) { /* the daemon stopped reading: start over with a fresh connection and LIVE list */
        mosquitto_log_printf(MOSQ_LOG_WARNING, "iotbridge_auth: the auth daemon does not read its events");
        events_reset = true;
        return;
    }
    if (out_len + n > out_cap) {
        size_t cap = out_cap ? out_cap * 2 : 64 * 1024;
        while (cap < out_len + n) cap *= 2;
        char *p = mosquitto_realloc(out_buf, cap);
        if (!p) {
            events_reset = true; /* a line lost: the next connection's LIVE list tells the daemon again */
            return;
        }
        out_buf = p;
        out_cap = cap;
    }
    memcpy(out_buf + out_len, text, n);
    out_len += n;
}

static void events_line(const char *verb, const char *arg)
{
    char line[600];
    int n = snprintf(line, sizeof line, arg ? "%s %s\n" : "%s\n", verb, arg ? arg : "");
    if (n > 0 && (size_t)n < sizeof line) events_append(line, (size_t)n);
}

static void events_sid_line(const char *verb, unsigned long long sid)
{
    char arg[24];
    snprintf(arg, sizeof arg, "%llu", sid);
    events_line(verb, arg);
}

/* The LIVE list, a part at a time: whole buckets while less than LIVE_CHUNK waits, then SYNCED. A session admitted
 * meanwhile has a session id above the EVENTS line's (the daemon keeps it); one that ends meanwhile sends its GONE. */
static void events_stream(void)
{
    while (events_fd >= 0 && live_cursor >= 0 && !events_reset) {
        while (live_cursor < BUCKETS && out_len < LIVE_CHUNK) {
            for (const struct session *s = by_client[live_cursor]; s; s = s->by_client) {
                if (s->kicked) continue;
                char line[600];
                int n = snprintf(line, sizeof line, "LIVE %llu %lld %s\n", s->sid, (long long)s->deadline, s->id);
                if (n > 0 && (size_t)n < sizeof line) events_append(line, (size_t)n);
            }
            live_cursor++;
        }
        if (live_cursor == BUCKETS) {
            events_line("SYNCED", NULL);
            live_cursor = -1;
        }
        events_flush();
        if (out_len) return; /* the socket takes no more now: the next tick goes on */
    }
}

static void events_connect(void)
{
    events_fd = daemon_connect(false);
    if (events_fd < 0) return;
    events_sid_line("EVENTS", max_sid);
    live_cursor = 0;
    events_stream();
}

static void kick(const char *id, const char *why)
{
    mosquitto_log_printf(MOSQ_LOG_NOTICE, "iotbridge_auth: ending %s: %s", id, why);
    mosquitto_kick_client_by_clientid(id, false); /* without the will: a revoked identity's will is not its telemetry */
}

/* KICK <sid>: that session, if Mosquitto still holds it (not ended, not taken over by a newer CONNECT). */
static void kick_sid(const char *arg)
{
    char *end;
    unsigned long long sid = strtoull(arg, &end, 10);
    if (end == arg || *end) return;
    struct session *s = session_by_sid(sid);
    if (!s || s->kicked || superseded(s)) return;
    s->kicked = true;
    char *id = mosquitto_strdup(s->id); /* the kick runs the DISCONNECT event, which frees s */
    if (id) kick(id, "revoked (registry change)");
    mosquitto_free(id);
}

static void events_read(void)
{
    while (events_fd >= 0) {
        ssize_t r = recv(events_fd, in_buf + in_len, sizeof in_buf - in_len, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
        if (r <= 0) {
            events_close();
            return;
        }
        in_len += (size_t)r;
        /* The complete lines are taken out of the buffer first: a kick runs the DISCONNECT event at once. */
        char *last = memrchr(in_buf, '\n', in_len);
        if (!last) {
            if (in_len == sizeof in_buf) in_len = 0; /* a line longer than any KICK: dropped */
            continue;
        }
        size_t n = (size_t)(last - in_buf) + 1;
        char *lines = mosquitto_malloc(n + 1);
        if (!lines) return;
        memcpy(lines, in_buf, n);
        lines[n] = '\0';
        in_len -= n;
        memmove(in_buf, in_buf + n, in_len);
        for (char *line = lines, *nl; (nl = strchr(line, '\n')) != NULL; line = nl + 1) {
            *nl = '\0';
            if (strncmp(line, "KICK ", 5) == 0) kick_sid(line + 5);
        }
        mosquitto_free(lines);
    }
}

/* ------------------------------------------------------------------------------------------- the events */

static int on_basic_auth(int event, void *event_data, void *userdata)
{
    (void)event;
    (void)userdata;
    struct mosquitto_evt_basic_auth *ed = event_data;
    const char *client_id = mosquitto_client_id(ed->client);
    const char *device = device_of(client_id);
    if (!device) { /* not a device: the host's own users and mechanisms, from the host's own address only */
        const char *address = mosquitto_client_address(ed->client);
        if (address && strcmp(address, internal_address) == 0) return MOSQ_ERR_PLUGIN_DEFER;
        mosquitto_log_printf(MOSQ_LOG_NOTICE, "iotbridge_auth: refused a client that is no device from %s",
                             address ? address : "an unknown address");
        return MOSQ_ERR_AUTH;
    }
    if (!valid_device_id(device) || !ed->password || !ed->password[0] || strchr(ed->password, '\n')) {
        mosquitto_log_printf(MOSQ_LOG_NOTICE, "iotbridge_auth: refused a device client: bad client id or password");
        return MOSQ_ERR_AUTH;
    }
    if (!mosquitto_client_clean_session(ed->client)) { /* as IoT Core: no session outlives its connection */
        mosquitto_log_printf(MOSQ_LOG_NOTICE, "iotbridge_auth: %s refused: a persistent session (clean session "
                                              "or clean start false) is not supported", device);
        return MOSQ_ERR_AUTH;
    }
    if (now_ms() < auth_refuse_until) {
        mosquitto_log_printf(MOSQ_LOG_WARNING, "iotbridge_auth: the auth daemon is slow to answer; %s refused",
                             device);
        return MOSQ_ERR_AUTH;
    }
    const char *address = mosquitto_client_address(ed->client);
    char answer[ANSWER_MAX];
    enum ask asked = daemon_ask(client_id, address && !strchr(address, '\n') ? address : "", ed->password, answer,
                                sizeof answer);
    if (asked != ASK_ANSWERED) {
        if (asked == ASK_TIMEOUT) auth_refuse_until = now_ms() + AUTH_REFUSE_MS;
        mosquitto_log_printf(MOSQ_LOG_WARNING, "iotbridge_auth: the auth daemon %s; %s refused",
                             asked == ASK_TIMEOUT ? "did not answer in time" : "cannot be reached", device);
        return MOSQ_ERR_AUTH;
    }
    if (strncmp(answer, "OK ", 3) == 0) {
        char *end, *end2 = answer;
        long long deadline = strtoll(answer + 3, &end, 10);
        unsigned long long sid = *end == ' ' ? strtoull(end + 1, &end2, 10) : 0;
        if (end != answer + 3 && deadline > 0 && sid > 0 && *end2 == '\0') {
            if (sid > max_sid) max_sid = sid;
            if (session_add(ed->client, client_id, sid, (time_t)deadline)) return MOSQ_ERR_SUCCESS;
            events_sid_line("GONE", sid); /* out of memory: refused, and the daemon forgets it */
            mosquitto_log_printf(MOSQ_LOG_ERR, "iotbridge_auth: out of memory; %s refused", device);
            return MOSQ_ERR_AUTH;
        }
    }
    mosquitto_log_printf(MOSQ_LOG_NOTICE, "iotbridge_auth: %s refused: %s", device,
                         strncmp(answer, "NO ", 3) == 0 ? answer + 3 : "unreadable answer");
    return MOSQ_ERR_AUTH;
}

/* Whether topic is /devices/DEVICE/WHAT, or (sub) /devices/DEVICE/WHAT/... with a non-empty rest */
static bool topic_is(const char *topic, const char *device, const char *what, bool sub)
{
    size_t dn = strlen(device), wn = strlen(what);
    if (strncmp(topic, "/devices/", 9) != 0 || strncmp(topic + 9, device, dn) != 0 || topic[9 + dn] != '/')
        return false;
    const char *rest = topic + 10 + dn;
    if (strncmp(rest, what, wn) != 0) return false;
    return rest[wn] == '\0' || (sub && rest[wn] == '/' && rest[wn + 1] != '\0');
}

/* A subscription a device may hold: its config, its commands, or one sub-folder of them (with or without /#). */
static bool subscription_allowed(const char *t, const char *device)
{
    if (topic_is(t, device, "config", false) || topic_is(t, device, "commands", false) ||
        topic_is(t, device, "commands/#", false))
        return true;
    if (!topic_is(t, device, "commands", true)) return false;
    const char *folder = t + 9 + strlen(device) + strlen("/commands/");
    size_t n = strlen(folder);
    if (n >= 2 && strcmp(folder + n - 2, "/#") == 0) n -= 2;
    if (n == 0) return false;
    for (size_t i = 0; i < n; i++)
        if (folder[i] == '+' || folder[i] == '#') return false;
    return true;
}

static int on_acl_check(int event, void *event_data, void *userdata)
{
    (void)event;
    (void)userdata;
    struct mosquitto_evt_acl_check *ed = event_data;
    const char *device = device_of(mosquitto_client_id(ed->client));
    if (!device) return MOSQ_ERR_PLUGIN_DEFER;
    const char *t = ed->topic;
    if (!t || !valid_device_id(device)) return MOSQ_ERR_ACL_DENIED;
    switch (ed->access) {
    case MOSQ_ACL_WRITE:
        if (ed->qos > 1 || ed->retain || strpbrk(t, "+#")) return MOSQ_ERR_ACL_DENIED;
        if (topic_is(t, device, "events", true)) return ed->payloadlen <= events_max ? MOSQ_ERR_SUCCESS
                                                                                      : MOSQ_ERR_ACL_DENIED;
        if (topic_is(t, device, "state", false)) return ed->payloadlen <= state_max ? MOSQ_ERR_SUCCESS
                                                                                    : MOSQ_ERR_ACL_DENIED;
        return MOSQ_ERR_ACL_DENIED;
    case MOSQ_ACL_SUBSCRIBE:
        if (!subscription_allowed(t, device)) return MOSQ_ERR_ACL_DENIED;
        if (topic_is(t, device, "config", false)) { /* the daemon asks for the config (an empty one too), as the front */
            const struct session *s = session_of(ed->client);
            if (s) events_sid_line("SUBSCRIBED", s->sid);
        }
        return MOSQ_ERR_SUCCESS;
    case MOSQ_ACL_UNSUBSCRIBE:
        return subscription_allowed(t, device) ? MOSQ_ERR_SUCCESS : MOSQ_ERR_ACL_DENIED;
    case MOSQ_ACL_READ:
        return topic_is(t, device, "config", false) || topic_is(t, device, "commands", true) ? MOSQ_ERR_SUCCESS
                                                                                             : MOSQ_ERR_ACL_DENIED;
    default:
        return MOSQ_ERR_ACL_DENIED;
    }
}

static int on_disconnect(int event, void *event_data, void *userdata)
{
    (void)event;
    (void)userdata;
    struct mosquitto_evt_disconnect *ed = event_data;
    struct session *s = session_take(ed->client);
    if (!s) return MOSQ_ERR_SUCCESS;
    events_sid_line("GONE", s->sid); /* sent on the next tick */
    mosquitto_free(s->id);
    mosquitto_free(s);
    return MOSQ_ERR_SUCCESS;
}

static int on_tick(int event, void *event_data, void *userdata)
{
    (void)event;
    (void)userdata;
    struct mosquitto_evt_tick *ed = event_data;
    time_t now = ed->now_s ? ed->now_s : time(NULL);
    if (events_reset) {
        events_close();
        events_reset = false;
    }
    if (events_fd < 0 && now != last_connect_try) {
        last_connect_try = now;
        events_connect();
    }
    events_read();
    events_stream();
    events_flush();
    if (now == last_scan || session_count == 0) return MOSQ_ERR_SUCCESS;
    last_scan = now; /* deadlines are whole seconds: one scan a second, each session once, its client id's chain */
    /* The ids to kick are gathered first: a kick runs the DISCONNECT event at once, which frees its session. */
    char **due = NULL;
    size_t n = 0, cap = 0;
    for (unsigned b = 0; b < BUCKETS; b++)
        for (struct session *s = by_client[b]; s; s = s->by_client)
            if (!s->kicked && s->deadline <= now) {
                s->kicked = true;
                if (superseded(s)) continue;
                if (n == cap) {
                    char **grown = mosquitto_realloc(due, (cap = cap ? 2 * cap : 16) * sizeof *due);
                    if (!grown) {
                        s->kicked = false; /* the next scan */
                        break;
                    }
                    due = grown;
                }
                if ((due[n] = mosquitto_strdup(s->id)) != NULL) n++;
                else s->kicked = false;
            }
    for (size_t i = 0; i < n; i++) {
        kick(due[i], "session deadline (token, credential or 24 h)");
        mosquitto_free(due[i]);
    }
    mosquitto_free(due);
    return MOSQ_ERR_SUCCESS;
}

/* ------------------------------------------------------------------------------------ the plugin interface */

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
    for (int i = 0; i < supported_version_count; i++)
        if (supported_versions[i] == 5) return 5;
    return -1;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **userdata, struct mosquitto_opt *opts,
                          int opt_count)
{
    (void)userdata;
    plugin_id = identifier;
    for (int i = 0; i < opt_count; i++) {
        const char *k = opts[i].key, *v = opts[i].value;
        if (strcmp(k, "client_id_prefix") == 0) snprintf(prefix, sizeof prefix, "%s", v);
        else if (strcmp(k, "socket") == 0) snprintf(sock_path, sizeof sock_path, "%s", v);
        else if (strcmp(k, "events_max_bytes") == 0) events_max = (uint32_t)strtoul(v, NULL, 10);
        else if (strcmp(k, "state_max_bytes") == 0) state_max = (uint32_t)strtoul(v, NULL, 10);
        else if (strcmp(k, "internal_address") == 0) snprintf(internal_address, sizeof internal_address, "%s", v);
    }
    prefix_len = strlen(prefix);
    if (prefix_len < 20 || strncmp(prefix, "projects/", 9) != 0 || prefix[prefix_len - 1] != '/' || !sock_path[0]) {
        mosquitto_log_printf(MOSQ_LOG_ERR, "iotbridge_auth: needs plugin_opt_client_id_prefix "
                                           "(projects/P/locations/L/registries/R/devices/) and plugin_opt_socket");
        return MOSQ_ERR_INVAL;
    }
    if (mosquitto_callback_register(plugin_id, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL, NULL) ||
        mosquitto_callback_register(plugin_id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL, NULL) ||
        mosquitto_callback_register(plugin_id, MOSQ_EVT_DISCONNECT, on_disconnect, NULL, NULL) ||
        mosquitto_callback_register(plugin_id, MOSQ_EVT_TICK, on_tick, NULL, NULL))
        return MOSQ_ERR_UNKNOWN;
    return MOSQ_ERR_SUCCESS;
}

int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *opts, int opt_count)
{
    (void)userdata;
    (void)opts;
    (void)opt_count;
    mosquitto_callback_unregister(plugin_id, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL);
    mosquitto_callback_unregister(plugin_id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL);
    mosquitto_callback_unregister(plugin_id, MOSQ_EVT_DISCONNECT, on_disconnect, NULL);
    mosquitto_callback_unregister(plugin_id, MOSQ_EVT_TICK, on_tick, NULL);
    auth_close();
    events_close();
    for (unsigned b = 0; b < BUCKETS; b++) {
        while (by_client[b]) {
            struct session *s = by_client[b];
            by_client[b] = s->by_client;
            mosquitto_free(s->id);
            mosquitto_free(s);
        }
        by_sid[b] = by_id[b] = NULL;
    }
    session_count = 0;
    mosquitto_free(out_buf);
    out_buf = NULL;
    out_cap = 0;
    return MOSQ_ERR_SUCCESS;
}
