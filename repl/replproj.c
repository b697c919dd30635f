/* replproj.c — projections in the embedded REPL (see replproj.h).
 *
 * Owns the session's loaded projections (a small array; one session per
 * process).  Each is a proj (proj.h) with its own sandbox, fed from the
 * store with the same narrowest read as `tidemark project`
 * (proj_open_reader), in memory (opts.st = NULL).  Before status/state/query a loaded projection
 * catches up with events appended since (none, unless the REPL appended).
 * Ctrl-C stops a catch-up; the projection keeps what it has applied.
 * Values cross into the REPL's Lua state as msgpack (luamp_push, which
 * also revives sketches).
 */
#include "replproj.h"

#include <lauxlib.h>
#include <stdlib.h>
#include <string.h>

#include "luamp.h"
#include "mp.h"
#include "progress.h"
#include "proj.h"
#include "replay.h"

#define MAXPROJ 64

typedef struct loaded {
    char *name;
    char *file;
    proj *p;
    uint64_t scanned_to; /* store position the projection has caught up to */
} loaded;

static loaded g_proj[MAXPROJ];
static int g_nproj;

static loaded *find(const char *name) {
    for (int i = 0; i < g_nproj; i++)
        if (!strcmp(g_proj[i].name, name)) return &g_proj[i];
    return NULL;
}

static void fault_text(const proj *p, const tm_err *e, buf *out) {
    const proj_fault *f = proj_fault_info(p);
    buf_puts(out, e->msg);
    if (f && f->traceback && strchr(f->traceback, '\n'))
        buf_printf(out, "\n%s", strchr(f->traceback, '\n') + 1);
}

/* Feed everything after `from` (exclusive).  0 ok, 1 interrupted,
 * -1 error (err set; *faulted when the projection faulted). */
static int catch_up(repl *r, loaded *l, int show_progress, tm_err *err, int *faulted) {
    store *s = replsrc_store(r->src);
    proj *p = l->p;
    uint64_t last = store_last_position(s);
    *faulted = 0;
    if (proj_fault_info(p)) return 0;
    if (l->scanned_to >= last) return 0;
    progress *pg = show_progress && r->progress ? progress_new(stderr, l->name, last, "events", 0)
                                                : NULL;
    int status = 0;
    uint64_t seen = 0;
    for (;;) {
        store_iter *it = proj_open_reader(s, p, proj_position(p) + 1, err);
        if (!it) {
            status = -1;
            break;
        }
        tm_event ev;
        int rc = 0, again = 0;
        while ((rc = store_iter_next(it, &ev, err)) == 1) {
            if (repl_cancel_requested()) {
                rc = 2;
                break;
            }
            if (ev.position > last) break;
            int f = proj_feed(p, &ev, err);
            if (f == PROJ_REPLAY) {
                again = 1;
                break;
            }
            if (f < 0) {
                rc = -2;
                break;
            }
            if ((++seen & 4095) == 0) progress_update(pg, ev.position, seen);
            if (proj_dead_letter_mode(p) && proj_uncommitted(p) >= 100000) {
                int c = proj_commit(p, err);
                if (c == PROJ_REPLAY) {
                    again = 1;
                    break;
                }
                if (c < 0) {
                    rc = -2;
                    break;
                }
            }
        }
        store_iter_free(it);
        if (again) continue;
        if (rc == 2) {
            proj_flush(p, err);
            status = 1;
            break;
        }
        if (rc == -2) {
            *faulted = 1;
            status = -1;
            break;
        }
        if (rc < 0) {
            status = -1;
            break;
        }
        int f = proj_flush(p, err);
        if (f == PROJ_REPLAY) continue;
        if (f < 0) {
            *faulted = 1;
            status = -1;
            break;
        }
        if (proj_dead_letter_mode(p)) {
            f = proj_commit(p, err);
            if (f == PROJ_REPLAY) continue;
            if (f < 0) {
                *faulted = 1;
                status = -1;
                break;
            }
        }
        l->scanned_to = last;
        break;
    }
    progress_end(pg);
    return status;
}

static proj *new_proj(lua_State *L, repl *r, const char *name, const char *src, size_t len,
                      const char *file) {
    proj_opts o;
    memset(&o, 0, sizeof o);
    o.memory_limit = (size_t)1 << 30;
    o.cpu_limit = 0; /* the REPL's Ctrl-C is the control; no watchdog exit */
    o.st = NULL;
    tm_err e;
    err_clear(&e);
    proj *p = proj_new(name, src, len, file, &o, &e);
    if (!p) repllua_raise(L, r, &e);
    return p;
}

/* Push the msgpack value in b (or nil when empty). */
static void push_mp(lua_State *L, repl *r, const buf *b) {
    if (!b->len) {
        lua_pushnil(L);
        return;
    }
    tm_err e;
    err_clear(&e);
    if (luamp_push(L, b->ptr, b->len, &e) < 0) repllua_raise(L, r, &e);
}

static uint64_t count_items(const buf *b) {
    const char *p = b->ptr;
    mp_item it;
    if (!b->len || mp_next(&p, b->ptr + b->len, &it) < 0) return 0;
    return it.type == MP_ARRAY || it.type == MP_MAP ? it.v.n : 0;
}

/* Push the status table of a loaded projection. */
static void push_status(lua_State *L, repl *r, loaded *l) {
    store *s = replsrc_store(r->src);
    uint64_t last = store_last_position(s);
    tm_err e;
    err_clear(&e);
    lua_createtable(L, 0, 10);
    lua_pushstring(L, l->name);
    lua_setfield(L, -2, "name");
    const proj_fault *f = proj_fault_info(l->p);
    lua_pushstring(L, f ? "faulted" : l->scanned_to >= last ? "running (in this REPL)"
                                                            : "behind (catch-up interrupted)");
    lua_setfield(L, -2, "status");
    lua_pushnumber(L, (lua_Number)proj_position(l->p));
    lua_setfield(L, -2, "position");
    lua_pushnumber(L, (lua_Number)(last > l->scanned_to ? last - l->scanned_to : 0));
    lua_setfield(L, -2, "lag");
    lua_pushnumber(L, (lua_Number)proj_events(l->p));
    lua_setfield(L, -2, "events");
    buf b = BUF_INIT;
    if (proj_partitioned(l->p) && proj_partitions(l->p, &b, &e) == 0) {
        lua_pushnumber(L, (lua_Number)count_items(&b));
        lua_setfield(L, -2, "partitions");
    }
    buf_reset(&b);
    if (proj_state(l->p, &b, &e) == 0) {
        lua_pushnumber(L, (lua_Number)b.len);
        lua_setfield(L, -2, "state_bytes");
    }
    buf_free(&b);
    if (f) {
        lua_pushfstring(L, "position %f (%s): %s", (double)f->position, f->type, f->message);
        lua_setfield(L, -2, "error");
    }
    if (l->file) {
        lua_pushstring(L, l->file);
        lua_setfield(L, -2, "file");
    }
}

/* ---- projections persisted by a server in this directory ---- */

/* Calls fn for each NAME with a proj/NAME/cp key. */
static int stored_names(store *s, void (*fn)(void *, const char *, size_t), void *ud,
                        tm_err *err) {
    buf start = BUF_INIT;
    buf_puts(&start, "proj/");
    for (;;) {
        store_kv_iter *it = store_kv_scan(s, "proj/", 5, start.ptr, start.len, err);
        if (!it) return buf_free(&start), -1;
        const char *k, *v;
        size_t kl, vl;
        int rc = store_kv_next(it, &k, &kl, &v, &vl, err);
        if (rc <= 0) {
            store_kv_iter_free(it);
            buf_free(&start);
            return rc;
        }
        const char *slash = memchr(k + 5, '/', kl - 5);
        size_t nl = slash ? (size_t)(slash - (k + 5)) : kl - 5;
        buf name = BUF_INIT;
        buf_append(&name, k + 5, nl);
        store_kv_iter_free(it);
        if (slash) fn(ud, name.ptr, nl);
        buf_reset(&start);
        buf_puts(&start, "proj/");
        buf_append(&start, name.ptr, nl);
        buf_puts(&start, "/\xff\xff\xff\xff");
        buf_free(&name);
    }
}

static int stored_cp(store *s, const char *name, buf *out, tm_err *err) {
    buf key = BUF_INIT;
    buf_printf(&key, "proj/%s/cp", name);
    char *v;
    size_t vl;
    int rc = store_kv_get(s, key.ptr, key.len, &v, &vl, err);
    buf_free(&key);
    if (rc == 1) {
        buf_append(out, v, vl);
        free(v);
    }
    return rc;
}

typedef struct list_acc {
    lua_State *L;
    repl *r;
    int n;
} list_acc;

static void add_stored(void *ud, const char *name, size_t len) {
    list_acc *a = ud;
    char nm[512];
    if (len >= sizeof nm) return;
    memcpy(nm, name, len);
    nm[len] = 0;
    if (find(nm)) return; /* a loaded one shadows the stored one */
    lua_State *L = a->L;
    buf cp = BUF_INIT;
    tm_err e;
    err_clear(&e);
    if (stored_cp(replsrc_store(a->r->src), nm, &cp, &e) != 1) {
        buf_free(&cp);
        return; /* no checkpoint: not a projection */
    }
    lua_createtable(L, 0, 4);
    lua_pushstring(L, nm);
    lua_setfield(L, -2, "name");
    lua_pushstring(L, "stored (by a server)");
    lua_setfield(L, -2, "status");
    {
        const char *v;
        size_t vl;
        mp_item it;
        if (mp_map_find(cp.ptr, cp.len, "position", 8, &v, &vl) == 1 && mp_next(&v, v + vl, &it) == 0 &&
            it.type == MP_UINT) {
            lua_pushnumber(L, (lua_Number)it.v.u);
            lua_setfield(L, -2, "position");
            uint64_t last = store_last_position(replsrc_store(a->r->src));
            lua_pushnumber(L, (lua_Number)(last > it.v.u ? last - it.v.u : 0));
            lua_setfield(L, -2, "lag");
        }
    }
    buf_free(&cp);
    lua_rawseti(L, -2, ++a->n);
}

/* ---- Lua functions (T.proj.*) ---- */

static int l_list(lua_State *L) {
    repl *r = repllua_session(L);
    lua_newtable(L);
    list_acc a = {L, r, 0};
    for (int i = 0; i < g_nproj; i++) {
        push_status(L, r, &g_proj[i]);
        lua_rawseti(L, -2, ++a.n);
    }
    tm_err e;
    err_clear(&e);
    if (stored_names(replsrc_store(r->src), add_stored, &a, &e) < 0) return repllua_raise(L, r, &e);
    return 1;
}

static loaded *checked(lua_State *L, repl *r, const char *name) {
    loaded *l = find(name);
    if (!l) return NULL;
    tm_err e;
    err_clear(&e);
    int faulted;
    if (catch_up(r, l, 1, &e, &faulted) < 0 && !faulted) repllua_raise(L, r, &e);
    return l;
}

static int l_status(lua_State *L) {
    repl *r = repllua_session(L);
    const char *name = luaL_checkstring(L, 1);
    loaded *l = checked(L, r, name);
    if (l) {
        push_status(L, r, l);
        return 1;
    }
    lua_newtable(L);
    list_acc a = {L, r, 0};
    add_stored(&a, name, strlen(name));
    if (a.n == 0) {
        tm_err e;
        err_set(&e, TM_ENOTFOUND, "no projection '%s' (load(file) runs one here)", name);
        return repllua_raise(L, r, &e);
    }
    lua_rawgeti(L, -1, 1);
    return 1;
}

static int l_state(lua_State *L) {
    repl *r = repllua_session(L);
    const char *name = luaL_checkstring(L, 1);
    size_t kl = 0;
    const char *key = lua_isnoneornil(L, 2) ? NULL : luaL_checklstring(L, 2, &kl);
    loaded *l = checked(L, r, name);
    tm_err e;
    err_clear(&e);
    buf b = BUF_INIT;
    if (l) {
        int rc = key ? proj_get(l->p, key, kl, &b, &e) : proj_state(l->p, &b, &e);
        if (rc < 0) {
            buf_free(&b);
            return repllua_raise(L, r, &e);
        }
        push_mp(L, r, &b);
        buf_free(&b);
        return 1;
    }
    /* stored by a server: proj/NAME/s/KEY */
    store *s = replsrc_store(r->src);
    buf k = BUF_INIT;
    buf_printf(&k, "proj/%s/s/", name);
    if (key) {
        buf_append(&k, key, kl);
        char *v;
        size_t vl;
        int rc = store_kv_get(s, k.ptr, k.len, &v, &vl, &e);
        buf_free(&k);
        if (rc < 0) return repllua_raise(L, r, &e);
        if (rc == 0) return lua_pushnil(L), 1;
        buf_append(&b, v, vl);
        free(v);
        push_mp(L, r, &b);
        buf_free(&b);
        return 1;
    }
    store_kv_iter *it = store_kv_scan(s, k.ptr, k.len, NULL, 0, &e);
    if (!it) {
        buf_free(&k);
        return repllua_raise(L, r, &e);
    }
    const char *kk, *v;
    size_t kkl, vl;
    int rc, n = 0, single = 0;
    lua_newtable(L);
    while ((rc = store_kv_next(it, &kk, &kkl, &v, &vl, &e)) == 1) {
        buf_reset(&b);
        buf_append(&b, v, vl);
        if (kkl == k.len) { /* unpartitioned: the state itself */
            lua_pop(L, 1);
            push_mp(L, r, &b);
            single = 1;
            break;
        }
        lua_pushlstring(L, kk + k.len, kkl - k.len);
        push_mp(L, r, &b);
        lua_rawset(L, -3);
        n++;
    }
    store_kv_iter_free(it);
    buf_free(&k);
    buf_free(&b);
    if (rc < 0) return repllua_raise(L, r, &e);
    if (!single && n == 0) {
        lua_pop(L, 1);
        buf cp = BUF_INIT;
        int found = stored_cp(s, name, &cp, &e);
        buf_free(&cp);
        if (found != 1) {
            err_set(&e, TM_ENOTFOUND, "no projection '%s'", name);
            return repllua_raise(L, r, &e);
        }
        lua_pushnil(L);
    }
    return 1;
}

static int l_query(lua_State *L) {
    repl *r = repllua_session(L);
    const char *name = luaL_checkstring(L, 1);
    const char *qname = luaL_checkstring(L, 2);
    loaded *l = checked(L, r, name);
    tm_err e;
    err_clear(&e);
    if (!l) {
        err_set(&e, TM_ENOTFOUND, "no projection '%s' loaded here (load(file) first)", name);
        return repllua_raise(L, r, &e);
    }
    buf args = BUF_INIT, out = BUF_INIT;
    if (!lua_isnoneornil(L, 3) && luamp_encode(L, 3, "args", &args, &e) < 0) {
        buf_free(&args);
        return repllua_raise(L, r, &e);
    }
    int rc = proj_query(l->p, qname, args.len ? args.ptr : NULL, args.len, &out, &e);
    buf_free(&args);
    if (rc < 0) {
        buf_free(&out);
        return repllua_raise(L, r, &e);
    }
    push_mp(L, r, &out);
    buf_free(&out);
    return 1;
}

/* load(name, src, file) -> status table, after the catch-up over history. */
static int l_load(lua_State *L) {
    repl *r = repllua_session(L);
    const char *name = luaL_checkstring(L, 1);
    size_t len;
    const char *src = luaL_checklstring(L, 2, &len);
    const char *file = luaL_optstring(L, 3, NULL);
    proj *p = new_proj(L, r, name, src, len, file);
    loaded *l = find(name);
    if (l) { /* replace */
        proj_free(l->p);
        free(l->file);
    } else {
        if (g_nproj == MAXPROJ) {
            proj_free(p);
            return luaL_error(L, "too many projections loaded (%d)", MAXPROJ);
        }
        l = &g_proj[g_nproj++];
        l->name = strdup(name);
    }
    l->p = p;
    l->file = file ? strdup(file) : NULL;
    l->scanned_to = 0;
    tm_err e;
    err_clear(&e);
    int faulted;
    int rc = catch_up(r, l, 1, &e, &faulted);
    if (rc < 0 && !faulted) return repllua_raise(L, r, &e);
    if (rc < 0) {
        buf t = BUF_INIT;
        fault_text(p, &e, &t);
        fprintf(stderr, "projection %s faulted: %s\n", name, t.ptr);
        buf_free(&t);
    }
    if (rc == 1) fprintf(stderr, "interrupted: %s is behind; status(\"%s\") resumes it\n", name, name);
    push_status(L, r, l);
    return 1;
}

/* run(src, file) -> final state of a one-off run over all history, on
 * the parallel replay path of `tidemark project` (replay.h: one reader,
 * a worker per core routed by partition; the same bytes as one worker). */
static int l_run(lua_State *L) {
    repl *r = repllua_session(L);
    size_t len;
    const char *src = luaL_checklstring(L, 1, &len);
    const char *file = luaL_optstring(L, 2, "(run)");
    replay_opts ro;
    memset(&ro, 0, sizeof ro);
    ro.memory_limit = (size_t)1 << 30; /* per worker, as a loaded projection's */
    ro.cpu_limit = 0;                  /* the REPL's Ctrl-C is the control */
    ro.cancel = repl_cancel_flag();
    ro.progress = r->progress ? stderr : NULL;
    tm_err e;
    err_clear(&e);
    replay *rp = replay_new(replsrc_store(r->src), "run", src, len, file, &ro, &e);
    if (!rp) return repllua_raise(L, r, &e);
    int held = repl_jump_hold(); /* worker threads: no longjmp out of replay_run */
    int rc = replay_run(rp, &e);
    repl_jump_release(held);
    if (rc == REPLAY_CANCELLED) {
        replay_free(rp);
        lua_pushstring(L, "interrupted");
        return lua_error(L);
    }
    if (rc < 0) {
        const proj_fault *f = replay_fault(rp);
        buf t = BUF_INIT;
        buf_puts(&t, e.msg);
        if (f && f->traceback && strchr(f->traceback, '\n'))
            buf_printf(&t, "\n%s", strchr(f->traceback, '\n') + 1);
        replay_free(rp);
        r->fail_code = f ? 1 : (e.code ? e.code : 1);
        lua_pushinteger(L, r->fail_code);
        lua_setfield(L, LUA_REGISTRYINDEX, "tm.fail_code");
        lua_pushlstring(L, t.ptr, t.len);
        buf_free(&t);
        return lua_error(L);
    }
    buf b = BUF_INIT;
    if (replay_state(rp, &b, &e) < 0) {
        buf_free(&b);
        replay_free(rp);
        return repllua_raise(L, r, &e);
    }
    replay_free(rp);
    push_mp(L, r, &b);
    buf_free(&b);
    return 1;
}

static const luaL_Reg funcs[] = {
    {"list", l_list},   {"status", l_status}, {"state", l_state}, {"query", l_query},
    {"load", l_load},   {"run", l_run},       {NULL, NULL},
};

void replproj_register(lua_State *L, repl *r) {
    if (replsrc_is_remote(r->src)) return;
    lua_newtable(L);
    lua_pushlightuserdata(L, r);
    luaL_openlib(L, NULL, funcs, 1);
    lua_setfield(L, -2, "proj");
}

void replproj_close(void) {
    for (int i = 0; i < g_nproj; i++) {
        proj_free(g_proj[i].p);
        free(g_proj[i].name);
        free(g_proj[i].file);
    }
    g_nproj = 0;
}
