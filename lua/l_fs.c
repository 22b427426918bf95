/* l_fs.c — the C half of iddpm.fs (lua/iddpm/fs.lua), module iddpm._fs: file-system
 * calls made directly, never through a shell, so a path is only ever a path.
 *   kind(path [, nofollow]) -> "file" | "directory" | "link" | "fifo" | "socket" | "char"
 *                              | "block" | "other", and "dev:ino" (the file's identity),
 *                              or nil, message (no such path)
 *   mkdir(path) -> true | nil, message, errno        (one level; mode 0777 & ~umask)
 *   list(dir) -> sorted array of names (no "." / "..") | nil, message
 *   remove(path) -> true | nil, message               (unlink: files and links only)
 *   write_atomic(path, string)   exclusive temp file next to path, every write, flush,
 *                                fsync and close checked, renamed over path (engine/io)
 *   append(path, string)         one record appended with O_APPEND to a regular file (never
 *                                through a link); a short write is undone (truncated back)
 *                                and raised, so a full disk never leaves half a record
 *   lock(path) -> handle | nil, holder   exclusive flock(2) on path (created if needed,
 *                                never through a link); the file then holds "pid host".
 *                                | nil, nil, why: the file system has no locks
 *                                The lock lives until handle:close() or the handle is
 *                                collected; holder is the other process's "pid host".
 *   pid_alive(pid), getpid(), hostname()
 * Errors name the operation and the path. */
#include <errno.h>
#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "iddpm/io.h"
#include "l_common.h"

#define LOCK_MT "iddpm.FsLock"

static const char *kind_of(mode_t m) {
    if (S_ISREG(m)) return "file";
    if (S_ISDIR(m)) return "directory";
    if (S_ISLNK(m)) return "link";
    if (S_ISFIFO(m)) return "fifo";
    if (S_ISSOCK(m)) return "socket";
    if (S_ISCHR(m)) return "char";
    if (S_ISBLK(m)) return "block";
    return "other";
}

static int fail(lua_State *L, const char *op, const char *path) {
    int e = errno;
    lua_pushnil(L);
    lua_pushfstring(L, "%s: %s: %s", op, path, strerror(e));
    lua_pushinteger(L, e);
    return 3;
}

static int l_kind(lua_State *L) {
    const char *p = luaL_checkstring(L, 1);
    struct stat st;
    if ((lua_toboolean(L, 2) ? lstat(p, &st) : stat(p, &st)) != 0) return fail(L, "stat", p);
    lua_pushstring(L, kind_of(st.st_mode));
    lua_pushfstring(L, "%I:%I", (lua_Integer)st.st_dev, (lua_Integer)st.st_ino);
    return 2;
}

static int l_mkdir(lua_State *L) {
    const char *p = luaL_checkstring(L, 1);
    if (mkdir(p, 0777) != 0) return fail(L, "mkdir", p);
    lua_pushboolean(L, 1);
    return 1;
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

static int l_list(lua_State *L) {
    const char *p = luaL_checkstring(L, 1);
    DIR *d = opendir(p);
    if (!d) return fail(L, "list", p);
    size_t n = 0, cap = 0;
    char **names = NULL;
    struct dirent *e;
    int oom = 0;
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        if (n == cap) {
            cap = cap ? 2 * cap : 64;
            char **nn = realloc(names, cap * sizeof *nn);
            if (!nn) { oom = 1; break; }
            names = nn;
        }
        if (!(names[n] = strdup(e->d_name))) { oom = 1; break; }
        n++;
    }
    closedir(d);
    if (!oom) qsort(names, n, sizeof *names, cmp_str);   /* byte order, as LC_ALL=C sort */
    if (!oom) {
        lua_createtable(L, (int)n, 0);
        for (size_t i = 0; i < n; i++) {
            lua_pushstring(L, names[i]);
            lua_rawseti(L, -2, (lua_Integer)i + 1);
        }
    }
    for (size_t i = 0; i < n; i++) free(names[i]);
    free(names);
    if (oom) return luaL_error(L, "list: %s: out of memory", p);
    return 1;
}

static int l_remove(lua_State *L) {
    const char *p = luaL_checkstring(L, 1);
    if (unlink(p) != 0) return fail(L, "remove", p);
    lua_pushboolean(L, 1);
    return 1;
}

static int l_write_atomic(lua_State *L) {
    const char *p = luaL_checkstring(L, 1);
    size_t n;
    const char *s = luaL_checklstring(L, 2, &n);
    if (idd_write_file_atomic(p, s, n, "write") != IDD_OK) return lt_error(L);
    return 0;
}

static int l_append(lua_State *L) {
    const char *p = luaL_checkstring(L, 1);
    size_t n;
    const char *s = luaL_checklstring(L, 2, &n);
    int fd = open(p, O_WRONLY | O_APPEND | O_CREAT | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC, 0666);
    if (fd < 0) return luaL_error(L, "append: %s: cannot open: %s", p, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return luaL_error(L, "append: %s: not a regular file", p);
    }
    size_t done = 0;
    int err = 0;
    while (done < n) {
        ssize_t w = write(fd, s + done, n - done);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) { err = w < 0 ? errno : EIO; break; }
        done += (size_t)w;
    }
    if (err) {
        /* undo the part that went in, so the file holds whole records only */
        if (done && ftruncate(fd, st.st_size) != 0) { /* best effort; the error below names the file */ }
        close(fd);
        return luaL_error(L, "append: %s: write failed after %d of %d bytes: %s", p, (int)done, (int)n,
                          strerror(err));
    }
    if (close(fd) != 0) return luaL_error(L, "append: %s: close failed: %s", p, strerror(errno));
    return 0;
}

// ---------------------------------------------------------------- locks

typedef struct { int fd; } lock_ud;

static int lock_close(lua_State *L) {
    lock_ud *u = luaL_checkudata(L, 1, LOCK_MT);
    if (u->fd >= 0) close(u->fd);   /* closing the descriptor releases the flock */
    u->fd = -1;
    return 0;
}

static int l_lock(lua_State *L) {
    const char *p = luaL_checkstring(L, 1);
    int fd = open(p, O_RDWR | O_CREAT | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC, 0666);
    if (fd < 0) return luaL_error(L, "lock: %s: cannot open: %s", p, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return luaL_error(L, "lock: %s: not a regular file", p);
    }
    if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
        int e = errno;
        char buf[256];
        ssize_t r = e == EWOULDBLOCK ? pread(fd, buf, sizeof buf - 1, 0) : -1;
        close(fd);
        if (e == ENOLCK || e == EOPNOTSUPP || e == ENOSYS) {   /* a file system without locks */
            lua_pushnil(L);
            lua_pushnil(L);
            lua_pushfstring(L, "%s: %s", p, strerror(e));
            return 3;
        }
        if (e != EWOULDBLOCK) return luaL_error(L, "lock: %s: %s", p, strerror(e));
        buf[r > 0 ? r : 0] = 0;
        buf[strcspn(buf, "\n")] = 0;
        lua_pushnil(L);
        lua_pushstring(L, buf[0] ? buf : "unknown process");
        return 2;
    }
    char host[256] = "?", text[320];
    if (gethostname(host, sizeof host - 1) != 0) strcpy(host, "?");
    host[sizeof host - 1] = 0;
    int len = snprintf(text, sizeof text, "pid %ld on host %s\n", (long)getpid(), host);
    if (ftruncate(fd, 0) != 0 || pwrite(fd, text, (size_t)len, 0) != len) {
        int e = errno;
        close(fd);
        return luaL_error(L, "lock: %s: cannot write: %s", p, strerror(e));
    }
    lock_ud *u = lua_newuserdatauv(L, sizeof *u, 0);
    u->fd = fd;
    luaL_setmetatable(L, LOCK_MT);
    return 1;
}

static int l_pid_alive(lua_State *L) {
    lua_Integer pid = luaL_checkinteger(L, 1);
    lua_pushboolean(L, pid > 0 && (kill((pid_t)pid, 0) == 0 || errno == EPERM));
    return 1;
}

static int l_getpid(lua_State *L) {
    lua_pushinteger(L, (lua_Integer)getpid());
    return 1;
}

static int l_hostname(lua_State *L) {
    char host[256];
    if (gethostname(host, sizeof host - 1) != 0) strcpy(host, "?");
    host[sizeof host - 1] = 0;
    lua_pushstring(L, host);
    return 1;
}

static const luaL_Reg fs_functions[] = {
    {"kind", l_kind}, {"mkdir", l_mkdir}, {"list", l_list}, {"remove", l_remove},
    {"write_atomic", l_write_atomic}, {"append", l_append}, {"lock", l_lock},
    {"pid_alive", l_pid_alive}, {"getpid", l_getpid}, {"hostname", l_hostname}, {NULL, NULL}};

int luaopen_iddpm_fs_c(lua_State *L);
int luaopen_iddpm_fs_c(lua_State *L) {
    if (luaL_newmetatable(L, LOCK_MT)) {
        lua_pushcfunction(L, lock_close);
        lua_setfield(L, -2, "__gc");
        lua_pushcfunction(L, lock_close);
        lua_setfield(L, -2, "__close");
        lua_newtable(L);
        lua_pushcfunction(L, lock_close);
        lua_setfield(L, -2, "close");
        lua_setfield(L, -2, "__index");
    }
    lua_pop(L, 1);
    luaL_newlib(L, fs_functions);
    return 1;
}
