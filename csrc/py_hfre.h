/* py_hfre.h — Python bindings of the hfre core (included by module.c, after its shared helpers:
 * raise_status, to_weight, to_f32_vec, get_item, get_int, load_weight). Only module.c includes it. */
static int py_hfre_register(PyObject *mod) {
    (void)mod;
    return 0;
}
