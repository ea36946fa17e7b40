/* py_davit.h — Python bindings of the davit core (included by module.c, after its shared helpers:
 * raise_status, to_weight, to_f32_vec, get_item, get_int, load_weight). Only module.c includes it. */
static int py_davit_register(PyObject *mod) {
    (void)mod;
    return 0;
}
