/* l_diffusion.c — the C core of iddpm.diffusion, registered as "iddpm._diffusion".
 * The public API (D.new, diff:p_sample_loop, ...) is the pure-Lua module
 * lua/iddpm/diffusion.lua, which calls these thin wrappers:
 *
 *   C.betas_named(name, T) -> {betas}           C.betas_from_alpha_bar(T, fn [, max_beta])
 *   C.space_timesteps(T, spec) -> {0-based steps}
 *   C.new(betas, respacing, mean, var, loss, rescale_timesteps) -> Diffusion userdata
 *   C.normal_kl(m1, lv1, m2, lv2), C.dgll(x, means, log_scales)  (tensors or numbers)
 *   C.mean_flat_sq_diff(a, b), C.sampler(name, T) -> TimestepSampler userdata
 *
 * Diffusion methods take tensors; t is an int64 tensor (the Lua side converts
 * arrays). Every engine error becomes a Lua error carrying the engine's message. */
#include <stdlib.h>
#include <string.h>

#include "iddpm/diffusion_ops.h"
#include "l_common.h"

#define DIFF_MT "iddpm.Diffusion"
#define SAMPLER_MT "iddpm.TimestepSampler"

// ---------------------------------------------------------------- helpers

static void push_doubles(lua_State *L, const double *v, int64_t n) {
    lua_createtable(L, (int)n, 0);
    for (int64_t i = 0; i < n; i++) { lua_pushnumber(L, v[i]); lua_rawseti(L, -2, i + 1); }
}

static void push_ints(lua_State *L, const int64_t *v, int64_t n) {
    lua_createtable(L, (int)n, 0);
    for (int64_t i = 0; i < n; i++) { lua_pushinteger(L, v[i]); lua_rawseti(L, -2, i + 1); }
}

/* a Lua array of numbers -> doubles in a userdata pushed on the stack (Lua owns the
 * memory, so a later error cannot leak it; callers must not free it) */
static double *check_doubles(lua_State *L, int idx, int64_t *n, const char *what) {
    luaL_checktype(L, idx, LUA_TTABLE);
    *n = (int64_t)luaL_len(L, idx);
    double *v = lua_newuserdatauv(L, sizeof(double) * (size_t)(*n > 0 ? *n : 1), 0);
    for (int64_t i = 0; i < *n; i++) {
        lua_geti(L, idx, i + 1);
        int ok;
        v[i] = lua_tonumberx(L, -1, &ok);
        lua_pop(L, 1);
        if (!ok) luaL_error(L, "%s: entry %d is not a number", what, (int)(i + 1));
    }
    return v;
}

static idd_diffusion *check_diff(lua_State *L, int idx) {
    idd_diffusion **box = luaL_checkudata(L, idx, DIFF_MT);
    if (!*box) luaL_argerror(L, idx, "diffusion was freed");
    return *box;
}

static idd_tensor *opt_tensor(lua_State *L, int idx) { return lua_isnoneornil(L, idx) ? NULL : lt_check(L, idx); }

static idd_generator *opt_gen(lua_State *L, int idx) {
    if (lua_isnoneornil(L, idx)) return idd_default_generator();
    return luaL_checkudata(L, idx, "iddpm.Generator");
}

// ---------------------------------------------------------------- schedules

static int l_betas_named(lua_State *L) {
    const char *name = luaL_checkstring(L, 1);
    lua_Integer T = luaL_checkinteger(L, 2);
    if (T < 1) return luaL_error(L, "diffusion.schedule: T must be >= 1, got %d", (int)T);
    double *b = malloc(sizeof(double) * (size_t)T);
    if (!b) return luaL_error(L, "diffusion.schedule: out of memory");
    if (idd_betas_named(name, T, b) != IDD_OK) { free(b); return lt_error(L); }
    push_doubles(L, b, T);
    free(b);
    return 1;
}

typedef struct { lua_State *L; int fn; } ab_ctx;

static idd_status call_alpha_bar(void *ud, double u, double *out) {
    ab_ctx *c = ud;
    lua_pushvalue(c->L, c->fn);
    lua_pushnumber(c->L, u);
    if (lua_pcall(c->L, 1, 1, 0) != LUA_OK) {
        idd_status st = idd_error("diffusion.schedule: alpha_bar(%g) raised: %s", u, lua_tostring(c->L, -1));
        lua_pop(c->L, 1);
        return st;
    }
    int ok;
    *out = lua_tonumberx(c->L, -1, &ok);
    lua_pop(c->L, 1);
    if (!ok) return idd_error("diffusion.schedule: alpha_bar(%g) did not return a number", u);
    return IDD_OK;
}

static int l_betas_from_alpha_bar(lua_State *L) {
    lua_Integer T = luaL_checkinteger(L, 1);
    luaL_checktype(L, 2, LUA_TFUNCTION);
    double max_beta = luaL_optnumber(L, 3, 0.999);
    if (T < 1) return luaL_error(L, "diffusion.schedule: T must be >= 1, got %d", (int)T);
    double *b = malloc(sizeof(double) * (size_t)T);
    if (!b) return luaL_error(L, "diffusion.schedule: out of memory");
    ab_ctx c = {L, 2};
    if (idd_betas_from_alpha_bar(T, call_alpha_bar, &c, max_beta, b) != IDD_OK) { free(b); return lt_error(L); }
    push_doubles(L, b, T);
    free(b);
    return 1;
}

static int l_space_timesteps(lua_State *L) {
    lua_Integer T = luaL_checkinteger(L, 1);
    const char *spec = luaL_optstring(L, 2, "");
    if (T < 1) return luaL_error(L, "diffusion.space_timesteps: T must be >= 1, got %d", (int)T);
    int64_t *use = malloc(sizeof(int64_t) * (size_t)T), n = 0;
    if (!use) return luaL_error(L, "diffusion.space_timesteps: out of memory");
    if (idd_space_timesteps(T, spec, use, &n) != IDD_OK) { free(use); return lt_error(L); }
    push_ints(L, use, n);
    free(use);
    return 1;
}

/* C.new(betas, respacing, mean_type, var_type, loss_type, rescale_timesteps) */
static int l_new(lua_State *L) {
    int64_t T;
    double *betas = check_doubles(L, 1, &T, "diffusion.new: betas");
    const char *spec = luaL_optstring(L, 2, "");
    const char *mn = luaL_checkstring(L, 3), *vn = luaL_checkstring(L, 4), *ln = luaL_checkstring(L, 5);
    int rescale = lua_toboolean(L, 6);
    int m = idd_mean_type_from_name(mn), v = idd_var_type_from_name(vn), l = idd_loss_type_from_name(ln);
    if (m < 0 || v < 0 || l < 0) {
        if (m < 0) return luaL_error(L, "diffusion.new: unknown model_mean_type '%s' (epsilon, start_x, previous_x)", mn);
        if (v < 0) return luaL_error(L, "diffusion.new: unknown model_var_type '%s' (learned, fixed_small, fixed_large, learned_range)", vn);
        return luaL_error(L, "diffusion.new: unknown loss_type '%s' (mse, rescaled_mse, kl, rescaled_kl)", ln);
    }
    if (T < 1) return luaL_error(L, "diffusion.new: betas is empty (steps must be >= 1)");
    idd_schedule *base = NULL, *s = NULL;
    idd_status st = idd_schedule_new(&base, betas, T);
    if (st == IDD_OK) st = idd_schedule_respace_str(&s, base, spec);
    idd_schedule_free(base);
    if (st != IDD_OK) return luaL_error(L, "diffusion.new: %s", idd_last_error());
    idd_diffusion_cfg cfg = {(idd_mean_type)m, (idd_var_type)v, (idd_loss_type)l};
    idd_diffusion **box = lua_newuserdatauv(L, sizeof *box, 0);
    *box = NULL;
    luaL_setmetatable(L, DIFF_MT);
    *box = idd_diffusion_new(s, cfg, rescale);
    if (!*box) return lt_error(L);
    return 1;
}

static int d_gc(lua_State *L) {
    idd_diffusion **box = luaL_checkudata(L, 1, DIFF_MT);
    idd_diffusion_release(*box);
    *box = NULL;
    return 0;
}

/* d:arrays() -> {betas = {...}, ...}, T, T_original, timestep_map */
static int d_arrays(lua_State *L) {
    const idd_schedule *s = check_diff(L, 1)->s;
    lua_newtable(L);
    struct { const char *name; const double *v; } a[] = {
        {"betas", s->betas}, {"alphas", s->alphas}, {"alphas_cumprod", s->alphas_cumprod},
        {"alphas_cumprod_prev", s->alphas_cumprod_prev}, {"alphas_cumprod_next", s->alphas_cumprod_next},
        {"sqrt_alphas_cumprod", s->sqrt_alphas_cumprod},
        {"sqrt_one_minus_alphas_cumprod", s->sqrt_one_minus_alphas_cumprod},
        {"log_one_minus_alphas_cumprod", s->log_one_minus_alphas_cumprod},
        {"sqrt_recip_alphas_cumprod", s->sqrt_recip_alphas_cumprod},
        {"sqrt_recipm1_alphas_cumprod", s->sqrt_recipm1_alphas_cumprod},
        {"posterior_variance", s->posterior_variance},
        {"posterior_log_variance_clipped", s->posterior_log_variance_clipped},
        {"posterior_mean_coef1", s->posterior_mean_coef1}, {"posterior_mean_coef2", s->posterior_mean_coef2}};
    for (size_t i = 0; i < sizeof a / sizeof a[0]; i++) {
        push_doubles(L, a[i].v, s->T);
        lua_setfield(L, -2, a[i].name);
    }
    lua_pushinteger(L, s->T);
    lua_pushinteger(L, s->T_original);
    push_ints(L, s->timestep_map, s->T);
    return 4;
}

static int d_config(lua_State *L) {
    idd_diffusion *d = check_diff(L, 1);
    lua_pushstring(L, idd_mean_type_name(d->cfg.mean_type));
    lua_pushstring(L, idd_var_type_name(d->cfg.var_type));
    lua_pushstring(L, idd_loss_type_name(d->cfg.loss_type));
    lua_pushboolean(L, idd_var_is_learned(d->cfg.var_type));
    return 4;
}

// ---------------------------------------------------------------- tensor ops

static int d_model_t(lua_State *L) { return lt_push(L, idd_diff_model_t(check_diff(L, 1), lt_check(L, 2))); }

/* d:q_sample(x0, t, noise) */
static int d_q_sample(lua_State *L) {
    return lt_push(L, idd_diff_q_sample(check_diff(L, 1), lt_check(L, 2), lt_check(L, 3), lt_check(L, 4)));
}

static int push3(lua_State *L, idd_status st, idd_tensor *a, idd_tensor *b, idd_tensor *c) {
    if (st != IDD_OK) return lt_error(L);
    lt_push(L, a);
    lt_push(L, b);
    lt_push(L, c);
    return 3;
}

static int d_q_mean_variance(lua_State *L) {
    idd_tensor *m = NULL, *v = NULL, *lv = NULL;
    idd_status st = idd_diff_q_mean_variance(check_diff(L, 1), lt_check(L, 2), lt_check(L, 3), &m, &v, &lv);
    return push3(L, st, m, v, lv);
}

/* d:q_posterior(x0, xt, t) -> mean, variance, log_variance_clipped */
static int d_q_posterior(lua_State *L) {
    idd_tensor *m = NULL, *v = NULL, *lv = NULL;
    idd_status st = idd_diff_q_posterior(check_diff(L, 1), lt_check(L, 2), lt_check(L, 3), lt_check(L, 4), &m, &v, &lv);
    return push3(L, st, m, v, lv);
}

static int d_xstart_from_eps(lua_State *L) {
    return lt_push(L, idd_diff_predict_xstart_from_eps(check_diff(L, 1), lt_check(L, 2), lt_check(L, 3), lt_check(L, 4)));
}
static int d_eps_from_xstart(lua_State *L) {
    return lt_push(L, idd_diff_predict_eps_from_xstart(check_diff(L, 1), lt_check(L, 2), lt_check(L, 3), lt_check(L, 4)));
}

/* d:pred_xstart_raw(model_out, xt, t) */
static int d_pred_xstart_raw(lua_State *L) {
    return lt_push(L, idd_diff_pred_xstart_raw(check_diff(L, 1), lt_check(L, 2), lt_check(L, 3), lt_check(L, 4)));
}

/* d:p_finish(model_out, xt, t, pred_xstart, clip) -> mean, variance, log_variance, pred_xstart */
static int d_p_finish(lua_State *L) {
    idd_tensor *m = NULL, *v = NULL, *lv = NULL, *p = NULL;
    idd_status st = idd_diff_p_finish(check_diff(L, 1), lt_check(L, 2), lt_check(L, 3), lt_check(L, 4),
                                      lt_check(L, 5), lua_toboolean(L, 6), &m, &v, &lv, &p);
    if (st != IDD_OK) return lt_error(L);
    lt_push(L, m); lt_push(L, v); lt_push(L, lv); lt_push(L, p);
    return 4;
}

/* d:p_sample_step(mean, log_variance, noise|nil, t) */
static int d_p_sample_step(lua_State *L) {
    return lt_push(L, idd_diff_p_sample_step(check_diff(L, 1), lt_check(L, 2), lt_check(L, 3), opt_tensor(L, 4),
                                             lt_check(L, 5)));
}

/* d:ddim_step(xt, pred_xstart, noise|nil, t, eta) */
static int d_ddim_step(lua_State *L) {
    return lt_push(L, idd_diff_ddim_step(check_diff(L, 1), lt_check(L, 2), lt_check(L, 3), opt_tensor(L, 4),
                                         lt_check(L, 5), luaL_optnumber(L, 6, 0.0)));
}

/* d:ddim_reverse_step(xt, pred_xstart, t, eta) */
static int d_ddim_reverse_step(lua_State *L) {
    return lt_push(L, idd_diff_ddim_reverse_step(check_diff(L, 1), lt_check(L, 2), lt_check(L, 3), lt_check(L, 4),
                                                 luaL_optnumber(L, 5, 0.0)));
}

/* d:training_losses(model_out, x0, xt, noise, t) -> loss, mse, vb */
static int d_training_losses(lua_State *L) {
    idd_tensor *l = NULL, *m = NULL, *v = NULL;
    idd_status st = idd_diff_training_losses(check_diff(L, 1), lt_check(L, 2), lt_check(L, 3), lt_check(L, 4),
                                             lt_check(L, 5), lt_check(L, 6), &l, &m, &v);
    return push3(L, st, l, m, v);
}

/* d:vb_terms_bpd(model_out, x0, xt, t, clip) -> vb, pred_xstart */
static int d_vb_terms_bpd(lua_State *L) {
    idd_tensor *v = NULL, *p = NULL;
    if (idd_diff_vb_terms_bpd(check_diff(L, 1), lt_check(L, 2), lt_check(L, 3), lt_check(L, 4), lt_check(L, 5),
                              lua_toboolean(L, 6), &v, &p) != IDD_OK)
        return lt_error(L);
    lt_push(L, v);
    lt_push(L, p);
    return 2;
}

static int d_prior_bpd(lua_State *L) { return lt_push(L, idd_diff_prior_bpd(check_diff(L, 1), lt_check(L, 2))); }

static int l_mean_flat_sq_diff(lua_State *L) { return lt_push(L, idd_diff_mean_flat_sq_diff(lt_check(L, 1), lt_check(L, 2))); }

/* arguments: tensors or numbers (numbers become 1-element tensors) */
static int elementwise(lua_State *L, int n) {
    idd_tensor *in[4] = {NULL, NULL, NULL, NULL};
    for (int i = 0; i < n; i++) in[i] = lt_check_or_number(L, i + 1, NULL);
    return lt_push(L, n == 4 ? idd_diff_normal_kl(in[0], in[1], in[2], in[3]) : idd_diff_dgll(in[0], in[1], in[2]));
}
static int l_normal_kl(lua_State *L) { return elementwise(L, 4); }
static int l_dgll(lua_State *L) { return elementwise(L, 3); }

// ---------------------------------------------------------------- timestep samplers

static idd_timestep_sampler *check_sampler(lua_State *L, int idx) {
    idd_timestep_sampler **box = luaL_checkudata(L, idx, SAMPLER_MT);
    if (!*box) luaL_argerror(L, idx, "sampler was freed");
    return *box;
}

static int l_sampler(lua_State *L) {
    const char *name = luaL_checkstring(L, 1);
    lua_Integer T = luaL_checkinteger(L, 2);
    idd_timestep_sampler **box = lua_newuserdatauv(L, sizeof *box, 0);
    *box = NULL;
    luaL_setmetatable(L, SAMPLER_MT);
    if (idd_sampler_new(box, name, T) != IDD_OK) return luaL_error(L, "diffusion.sampler: %s", idd_last_error());
    return 1;
}

static int s_gc(lua_State *L) {
    idd_timestep_sampler **box = luaL_checkudata(L, 1, SAMPLER_MT);
    idd_sampler_free(*box);
    *box = NULL;
    return 0;
}

static idd_status gen_uniform(void *ud, double *u) {
    idd_rand_doubles(ud, u, 1);
    return IDD_OK;
}

/* s:sample(B [, generator]) -> t (int64 tensor), weights (float32 tensor) */
static int s_sample(lua_State *L) {
    idd_timestep_sampler *sp = check_sampler(L, 1);
    int64_t B = luaL_checkinteger(L, 2);
    luaL_argcheck(L, B >= 1, 2, "batch size must be >= 1");
    idd_generator *g = opt_gen(L, 3);
    idd_tensor *t = idd_tensor_new(IDD_I64, IDD_CPU, 1, &B), *w = idd_tensor_new(IDD_F32, IDD_CPU, 1, &B);
    double *wd = malloc(sizeof(double) * (size_t)B);
    /* one counter per draw, claimed at once: a sharded generator (data-parallel ranks)
     * gives each rank its slice of the global batch's draws */
    idd_generator one = {g->seed, g->stream, 0, 0, 0};
    if (t && w && wd) one.offset = idd_generator_claim(g, (uint64_t)B);
    idd_status st = t && w && wd ? idd_sampler_sample_cb(sp, B, gen_uniform, &one, idd_data(t), wd) : IDD_ERR;
    if (st == IDD_OK) for (int64_t b = 0; b < B; b++) ((float *)idd_data(w))[b] = (float)wd[b];
    free(wd);
    if (st != IDD_OK) { idd_tensor_release(t); idd_tensor_release(w); return lt_error(L); }
    lt_push(L, t);
    lt_push(L, w);
    return 2;
}

/* s:update(t int64 tensor, losses float tensor) */
static int s_update(lua_State *L) {
    idd_timestep_sampler *sp = check_sampler(L, 1);
    idd_tensor *t = lt_check(L, 2), *l = lt_check(L, 3);
    int64_t n = idd_numel(t);
    if (t->dtype != IDD_I64) return luaL_error(L, "sampler:update: t must be an int64 tensor");
    if (idd_numel(l) != n) return luaL_error(L, "sampler:update: %d timesteps but %d losses", (int)n, (int)idd_numel(l));
    int64_t *tv = malloc(sizeof(int64_t) * (size_t)(n ? n : 1));
    double *lv = malloc(sizeof(double) * (size_t)(n ? n : 1));
    for (int64_t i = 0; tv && lv && i < n; i++) { tv[i] = (int64_t)idd_get_flat(t, i); lv[i] = idd_get_flat(l, i); }
    idd_status st = tv && lv ? idd_sampler_update(sp, tv, lv, n) : IDD_ERR;
    free(tv);
    free(lv);
    if (st != IDD_OK) return lt_error(L);
    return 0;
}

static int s_weights(lua_State *L) {
    idd_timestep_sampler *sp = check_sampler(L, 1);
    int64_t T = idd_sampler_T(sp);
    double *w = malloc(sizeof(double) * (size_t)T);
    if (!w || idd_sampler_weights(sp, w) != IDD_OK) { free(w); return lt_error(L); }
    push_doubles(L, w, T);
    free(w);
    return 1;
}

/* s:state() -> {name =, T =, history = {T*10}, counts = {T}} */
static int s_state(lua_State *L) {
    idd_timestep_sampler *sp = check_sampler(L, 1);
    int64_t T = idd_sampler_T(sp);
    double *h = calloc((size_t)(T * IDD_LSM_HISTORY), sizeof(double));
    int64_t *c = calloc((size_t)T, sizeof(int64_t));
    if (!h || !c || idd_sampler_get_state(sp, h, c) != IDD_OK) { free(h); free(c); return lt_error(L); }
    lua_newtable(L);
    lua_pushstring(L, idd_sampler_name(sp)); lua_setfield(L, -2, "name");
    lua_pushinteger(L, T); lua_setfield(L, -2, "T");
    push_doubles(L, h, T * IDD_LSM_HISTORY); lua_setfield(L, -2, "history");
    push_ints(L, c, T); lua_setfield(L, -2, "counts");
    free(h);
    free(c);
    return 1;
}

static int s_load_state(lua_State *L) {
    idd_timestep_sampler *sp = check_sampler(L, 1);
    luaL_checktype(L, 2, LUA_TTABLE);
    int64_t T = idd_sampler_T(sp), nh, nc;
    lua_getfield(L, 2, "history");
    lua_getfield(L, 2, "counts");
    if (!lua_istable(L, -1) || !lua_istable(L, -2)) return luaL_error(L, "sampler:load_state: state needs history and counts");
    int hi = lua_gettop(L) - 1, ci = lua_gettop(L);   /* before check_doubles pushes its buffers */
    double *h = check_doubles(L, hi, &nh, "sampler:load_state: history");
    double *cd = check_doubles(L, ci, &nc, "sampler:load_state: counts");
    if (nh != T * IDD_LSM_HISTORY || nc != T) {
        return luaL_error(L, "sampler:load_state: state is for another T (history %d, counts %d; T = %d)", (int)nh,
                          (int)nc, (int)T);
    }
    int64_t *c = lua_newuserdatauv(L, sizeof(int64_t) * (size_t)T, 0);
    for (int64_t i = 0; i < T; i++) c[i] = (int64_t)cd[i];
    idd_status st = idd_sampler_set_state(sp, h, c);
    if (st != IDD_OK) return lt_error(L);
    return 0;
}

static int s_info(lua_State *L) {
    idd_timestep_sampler *sp = check_sampler(L, 1);
    lua_pushstring(L, idd_sampler_name(sp));
    lua_pushinteger(L, idd_sampler_T(sp));
    lua_pushboolean(L, idd_sampler_warmed_up(sp));
    return 3;
}

// ---------------------------------------------------------------- registration

static const luaL_Reg diff_methods[] = {
    {"arrays", d_arrays}, {"config", d_config}, {"model_t", d_model_t}, {"q_sample", d_q_sample},
    {"q_mean_variance", d_q_mean_variance}, {"q_posterior", d_q_posterior},
    {"predict_xstart_from_eps", d_xstart_from_eps}, {"predict_eps_from_xstart", d_eps_from_xstart},
    {"pred_xstart_raw", d_pred_xstart_raw}, {"p_finish", d_p_finish}, {"p_sample_step", d_p_sample_step},
    {"ddim_step", d_ddim_step}, {"ddim_reverse_step", d_ddim_reverse_step},
    {"training_losses", d_training_losses}, {"vb_terms_bpd", d_vb_terms_bpd}, {"prior_bpd", d_prior_bpd},
    {NULL, NULL}};

static const luaL_Reg sampler_methods[] = {
    {"sample", s_sample}, {"update", s_update}, {"weights", s_weights}, {"state", s_state},
    {"load_state", s_load_state}, {"info", s_info}, {NULL, NULL}};

static const luaL_Reg functions[] = {
    {"betas_named", l_betas_named}, {"betas_from_alpha_bar", l_betas_from_alpha_bar},
    {"space_timesteps", l_space_timesteps}, {"new", l_new}, {"normal_kl", l_normal_kl}, {"dgll", l_dgll},
    {"mean_flat_sq_diff", l_mean_flat_sq_diff}, {"sampler", l_sampler}, {NULL, NULL}};

static void new_class(lua_State *L, const char *mt, const luaL_Reg *methods, lua_CFunction gc) {
    luaL_newmetatable(L, mt);
    lua_newtable(L);
    luaL_setfuncs(L, methods, 0);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, gc);
    lua_setfield(L, -2, "__gc");
    lua_pop(L, 1);
}

int luaopen_iddpm_diffusion_core(lua_State *L);
int luaopen_iddpm_diffusion_core(lua_State *L) {
    new_class(L, DIFF_MT, diff_methods, d_gc);
    new_class(L, SAMPLER_MT, sampler_methods, s_gc);
    luaL_newlib(L, functions);
    lua_pushinteger(L, IDD_LSM_HISTORY);
    lua_setfield(L, -2, "LSM_HISTORY");
    return 1;
}
