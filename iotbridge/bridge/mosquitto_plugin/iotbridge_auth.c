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
 * MOSQ_EVT_BASIC_AUTH: one request on the auth connection (blocking, 5 s timeout, reconnected on failure; a failure
 *   refuses the CONNECT): "AUTH <client id>\n<peer address>\n<password>\n", answered "OK <deadline>\n" (unix
 *   seconds) or "NO <reason>\n". The username is ignored.
 * MOSQ_EVT_ACL_CHECK: a device publishes /devices/ID/events[/...] (at most events_max_bytes) and /devices/ID/state
 *   (at most state_max_bytes), QoS <= 1, never retained; subscribes to /devices/ID/config, /devices/ID/commands,
 *   /devices/ID/commands/# and a commands sub-folder (with or without /#); receives only those.
 * MOSQ_EVT_DISCONNECT: "GONE <client id>\n" on the events connection, once per admitted CONNECT.
 * MOSQ_EVT_TICK: the events connection is (re)connected: "EVENTS\n", then "LIVE <client id>\n" for every admitted
 *   session and "SYNCED\n" (the daemon reconciles its sessions with these); "KICK <client id>\n" lines from the
 *   daemon end a session without its will; a session whose deadline passed is ended the same way.
 */
#define _GNU_SOURCE /* memrchr */
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
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
#define OUT_MAX (4 * 1024 * 1024)
#define IN_MAX 4096

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

struct session {
    struct session *next;
    const struct mosquitto *client; /* the key: one entry per admitted CONNECT */
    char *id;
    time_t deadline;
    uint64_t seq; /* admission order: the newest session of a client id is the one Mosquitto keeps */
    bool kicked;
};
static struct session *sessions[BUCKETS];
static uint64_t next_seq;
static size_t session_count;

static unsigned slot(const struct mosquitto *client)
{
    uintptr_t p = (uintptr_t)client;
    return (unsigned)((p >> 4) ^ (p >> 20)) % BUCKETS;
}

static void session_add(const struct mosquitto *client, const char *id, time_t deadline)
{
    struct session *s = mosquitto_calloc(1, sizeof *s);
    if (!s) return;
    s->id = mosquitto_strdup(id);
    if (!s->id) {
        mosquitto_free(s);
        return;
    }
    s->client = client;
    s->deadline = deadline;
    s->seq = ++next_seq;
    unsigned h = slot(client);
    s->next = sessions[h];
    sessions[h] = s;
    session_count++;
}

/* The session of this CONNECT, unlinked; NULL when the plugin did not admit it. */
static struct session *session_take(const struct mosquitto *client)
{
    for (struct session **p = &sessions[slot(client)]; *p; p = &(*p)->next) {
        if ((*p)->client == client) {
            struct session *s = *p;
            *p = s->next;
            session_count--;
            return s;
        }
    }
    return NULL;
}

/* Whether a session admitted after s holds the same client id (then Mosquitto keeps that one, not s). */
static bool superseded(const struct session *s)
{
    for (unsigned b = 0; b < BUCKETS; b++)
        for (const struct session *o = sessions[b]; o; o = o->next)
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
    struct timeval tv = {.tv_sec = 5};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
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
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return false;
        p += w;
        n -= (size_t)w;
    }
    return true;
}

/* One AUTH request and its one-line answer; false when the daemon cannot be reached or does not answer in time. */
static bool daemon_ask(const char *client_id, const char *address, const char *password, char *answer, size_t cap)
{
    size_t a = strlen(client_id), b = strlen(address), c = strlen(password);
    size_t n = 5 + a + 1 + b + 1 + c + 1;
    char *req = mosquitto_malloc(n + 1);
    if (!req) return false;
    snprintf(req, n + 1, "AUTH %s\n%s\n%s\n", client_id, address, password);
    bool ok = false;
    for (int attempt = 0; attempt < 2 && !ok; attempt++) {
        if (auth_fd < 0 && (auth_fd = daemon_connect(true)) < 0) break;
        size_t got = 0;
        if (write_all(auth_fd, req, n)) {
            while (got < cap - 1) {
                ssize_t r = read(auth_fd, answer + got, cap - 1 - got);
                if (r < 0 && errno == EINTR) continue;
                if (r <= 0) break;
                got += (size_t)r;
                if (answer[got - 1] == '\n') {
                    ok = true;
                    break;
                }
            }
        }
        answer[got] = '\0';
        if (!ok) {
            close(auth_fd);
            auth_fd = -1;
        }
    }
    mosquitto_free(req);
    return ok;
}

/* The events connection, used only on the tick (never inside another event: a kick there runs the DISCONNECT event
 * at once). Its output is written without blocking Mosquitto (what the socket does not take waits here). */
static char *out_buf;
static size_t out_len, out_cap;
static char in_buf[IN_MAX];
static size_t in_len;
static bool events_reset; /* the output outgrew OUT_MAX: the next tick starts a fresh connection */

static void events_close(void)
{
    if (events_fd >= 0) close(events_fd);
    events_fd = -1;
    out_len = 0; /* what was not sent is replaced by the LIVE list of the next connection */
    in_len = 0;
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

static void events_line(const char *verb, const char *id)
{
    if (events_fd < 0) return;
    size_t n = strlen(verb) + (id ? 1 + strlen(id) : 0) + 1;
    if (events_reset) return;
    if (out_len + n > OUT_MAX) { /* the daemon stopped reading: start over with a fresh connection and LIVE list */
        mosquitto_log_printf(MOSQ_LOG_WARNING, "iotbridge_auth: the auth daemon does not read its events");
        events_reset = true;
        return;
    }
    if (out_len + n + 1 > out_cap) { /* + its NUL (snprintf) */
        size_t cap = out_cap ? out_cap * 2 : 64 * 1024;
        while (cap < out_len + n + 1) cap *= 2;
        char *p = mosquitto_realloc(out_buf, cap);
        if (!p) return;
        out_buf = p;
        out_cap = cap;
    }
    out_len += (size_t)snprintf(out_buf + out_len, n + 1, id ? "%s %s\n" : "%s\n", verb, id ? id : "");
}

static void events_connect(void)
{
    events_fd = daemon_connect(false);
    if (events_fd < 0) return;
    events_line("EVENTS", NULL);
    for (unsigned b = 0; b < BUCKETS; b++)
        for (const struct session *s = sessions[b]; s; s = s->next)
            if (!s->kicked) events_line("LIVE", s->id);
    events_line("SYNCED", NULL);
    events_flush();
}

static void kick(const char *id, const char *why)
{
    mosquitto_log_printf(MOSQ_LOG_NOTICE, "iotbridge_auth: ending %s: %s", id, why);
    mosquitto_kick_client_by_clientid(id, false); /* without the will: a revoked identity's will is not its telemetry */
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
            if (in_len == sizeof in_buf) in_len = 0; /* a line longer than any client id: dropped */
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
            if (strncmp(line, "KICK ", 5) == 0) kick(line + 5, "revoked (registry change)");
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
    const char *address = mosquitto_client_address(ed->client);
    char answer[512];
    if (!daemon_ask(client_id, address && !strchr(address, '\n') ? address : "", ed->password, answer,
                    sizeof answer)) {
        mosquitto_log_printf(MOSQ_LOG_WARNING, "iotbridge_auth: the auth daemon did not answer; %s refused", device);
        return MOSQ_ERR_AUTH;
    }
    answer[strcspn(answer, "\n")] = '\0';
    if (strncmp(answer, "OK ", 3) == 0) {
        char *end;
        long long deadline = strtoll(answer + 3, &end, 10);
        if (end != answer + 3 && *end == '\0' && deadline > 0) {
            session_add(ed->client, client_id, (time_t)deadline);
            return MOSQ_ERR_SUCCESS;
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
    events_line("GONE", s->id); /* sent on the next tick */
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
    events_flush();
    if (now == last_scan || session_count == 0) return MOSQ_ERR_SUCCESS;
    last_scan = now; /* deadlines are whole seconds: one scan a second */
    /* The ids to kick are gathered first: a kick runs the DISCONNECT event at once, which frees its session. */
    char **due = NULL;
    size_t n = 0, cap = 0;
    for (unsigned b = 0; b < BUCKETS; b++)
        for (struct session *s = sessions[b]; s; s = s->next)
            if (!s->kicked && s->deadline <= now) {
                s->kicked = true;
                if (superseded(s)) continue;
                if (n == cap) {
                    char **grown = mosquitto_realloc(due, (cap = cap ? 2 * cap : 16) * sizeof *due);
                    if (!grown) break;
                    due = grown;
                }
                if ((due[n] = mosquitto_strdup(s->id)) != NULL) n++;
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
    if (auth_fd >= 0) close(auth_fd);
    events_close();
    for (unsigned b = 0; b < BUCKETS; b++) {
        while (sessions[b]) {
            struct session *s = sessions[b];
            sessions[b] = s->next;
            mosquitto_free(s->id);
            mosquitto_free(s);
        }
    }
    mosquitto_free(out_buf);
    out_buf = NULL;
    out_cap = 0;
    return MOSQ_ERR_SUCCESS;
}
