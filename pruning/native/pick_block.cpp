// One block of DGMR greedy picks (see pruning/select.py, _pick_block): the per-pick vector work
// of the blocked method in compiled code, where NumPy's per-call overhead dominated.
// Same algorithm and tie rule as the NumPy path: a pool of the rows with the largest block-start
// norms is followed exactly; it doubles while a row outside it could still win, and the block
// ends early when it would pass `limit` rows.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

namespace {

// Sixteen independent partial sums: the compiler vectorises them without reassociating anything.
template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  constexpr int64_t kLanes = 16;
  T acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += a[i + l] * b[i + l];
  T s = 0;
  for (int64_t l = 0; l < kLanes; ++l) s += acc[l];
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// out[p] = row(p) . q for p < count: four rows per pass over q, so q is loaded once for four.
template <typename T, typename Row>
void dots(Row row, int64_t count, int64_t n, const T* q, T* out) {
  constexpr int64_t kLanes = 16;
  int64_t p = 0;
  for (; p + 4 <= count; p += 4) {
    const T *r0 = row(p), *r1 = row(p + 1), *r2 = row(p + 2), *r3 = row(p + 3);
    T a0[kLanes] = {}, a1[kLanes] = {}, a2[kLanes] = {}, a3[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes)
      for (int64_t l = 0; l < kLanes; ++l) {
        const T v = q[i + l];
        a0[l] += r0[i + l] * v;
        a1[l] += r1[i + l] * v;
        a2[l] += r2[i + l] * v;
        a3[l] += r3[i + l] * v;
      }
    T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (int64_t l = 0; l < kLanes; ++l) {
      s0 += a0[l];
      s1 += a1[l];
      s2 += a2[l];
      s3 += a3[l];
    }
    for (; i < n; ++i) {
      s0 += r0[i] * q[i];
      s1 += r1[i] * q[i];
      s2 += r2[i] * q[i];
      s3 += r3[i] * q[i];
    }
    out[p] = s0;
    out[p + 1] = s1;
    out[p + 2] = s2;
    out[p + 3] = s3;
  }
  for (; p < count; ++p) out[p] = dot(row(p), q, n);
}

template <typename T>
struct Pool {
  int64_t n, block;
  std::vector<int64_t> index;   // row number of each pool member
  std::vector<const T*> rows;   // block-start residual of each member, read in place
  std::vector<T> coef;          // [size, block] coefficients on the block's directions
  std::vector<double> current;  // exact current squared norms
};

template <typename T>
int64_t pick_block(const T* residual, int64_t ld, int64_t m, int64_t n, const double* sq_norm,
                   uint8_t* available, int64_t block, double tol2, int64_t limit, int64_t* picks,
                   T* basis, int64_t* exhausted) {
  const double neg_inf = -std::numeric_limits<double>::infinity();
  // Candidates by block-start bound, largest first, lower row first among equals.
  std::vector<int64_t> order;
  order.reserve(m);
  for (int64_t i = 0; i < m; ++i)
    if (available[i]) order.push_back(i);
  const int64_t left_total = static_cast<int64_t>(order.size());
  const int64_t want = std::min<int64_t>(left_total, limit * block * 2 + 1);
  auto by_bound = [&](int64_t a, int64_t b) {
    return sq_norm[a] > sq_norm[b] || (sq_norm[a] == sq_norm[b] && a < b);
  };
  std::nth_element(order.begin(), order.begin() + want - (want > 0), order.end(), by_bound);
  std::sort(order.begin(), order.begin() + want, by_bound);
  int64_t sorted_upto = want;

  Pool<T> pool{n, block, {}, {}, {}, {}};
  const int64_t expected = std::min<int64_t>(left_total, 2 * limit * block);  // doubling from 2 blocks stops here
  pool.index.reserve(expected);
  pool.rows.reserve(expected);
  pool.coef.reserve(expected * block);
  pool.current.reserve(expected);
  int64_t taken = 0;  // prefix of `order` in the pool
  int64_t j = 0;      // picks made in this block
  auto outside = [&]() -> double { return taken < left_total ? sq_norm[order[taken]] : neg_inf; };
  auto grow = [&](int64_t count) {
    count = std::min(count, left_total - taken);
    if (taken + count + 1 > sorted_upto && sorted_upto < left_total) {
      std::sort(order.begin() + sorted_upto, order.end(), by_bound);  // rarely needed
      sorted_upto = left_total;
    }
    const int64_t old = static_cast<int64_t>(pool.index.size());
    pool.index.resize(old + count);
    pool.rows.resize(old + count);
    pool.coef.resize((old + count) * block, T(0));
    pool.current.resize(old + count);
    for (int64_t p = old; p < old + count; ++p) {
      const int64_t row = order[taken + (p - old)];
      pool.index[p] = row;
      const T* src = residual + row * ld;
      pool.rows[p] = src;
      double cur = sq_norm[row];
      T* coef = pool.coef.data() + p * block;
      // the block's directions so far, four per pass over the row
      dots([&](int64_t t) { return basis + t * n; }, j, n, src, coef);
      for (int64_t t = 0; t < j; ++t) cur -= static_cast<double>(coef[t]) * static_cast<double>(coef[t]);
      pool.current[p] = cur;
    }
    taken += count;
  };
  auto best = [&]() -> int64_t {
    int64_t k = 0;
    for (int64_t p = 1; p < static_cast<int64_t>(pool.current.size()); ++p) {
      const double a = pool.current[p], b = pool.current[k];
      if (a > b || (a == b && pool.index[p] < pool.index[k])) k = p;
    }
    return k;
  };

  *exhausted = 0;
  grow(2 * block);
  std::vector<T> r(n), c2(block), column;
  for (j = 0; j < block; ++j) {
    int64_t k = best();
    // Strictly beating every outside bound proves no outside row can win or tie.
    while (pool.current[k] <= outside() && taken < left_total) {
      if (j && static_cast<int64_t>(pool.index.size()) >= limit * block) {
        for (int64_t t = 0; t < j; ++t) available[picks[t]] = 0;
        return j;
      }
      grow(2 * static_cast<int64_t>(pool.index.size()));
      k = best();
    }
    if (pool.current[k] <= tol2) {
      *exhausted = 1;
      for (int64_t t = 0; t < j; ++t) available[picks[t]] = 0;
      return j;
    }
    const T* row = pool.rows[k];
    std::copy(row, row + n, r.begin());
    for (int64_t t = 0; t < j; ++t) {
      const T c = pool.coef[k * block + t];
      const T* q = basis + t * n;
      for (int64_t i = 0; i < n; ++i) r[i] -= c * q[i];
    }
    dots([&](int64_t t) { return basis + t * n; }, j, n, r.data(), c2.data());  // second pass
    for (int64_t t = 0; t < j; ++t) {
      const T c = c2[t];
      const T* q = basis + t * n;
      for (int64_t i = 0; i < n; ++i) r[i] -= c * q[i];
    }
    const T inv = T(1) / std::sqrt(dot(r.data(), r.data(), n));
    T* q = basis + j * n;
    for (int64_t i = 0; i < n; ++i) q[i] = r[i] * inv;
    const int64_t size = static_cast<int64_t>(pool.index.size());
    column.resize(size);
    dots([&](int64_t p) { return pool.rows[p]; }, size, n, q, column.data());
    for (int64_t p = 0; p < size; ++p) {
      const T c = column[p];
      pool.coef[p * block + j] = c;
      pool.current[p] -= static_cast<double>(c) * static_cast<double>(c);
    }
    pool.current[k] = neg_inf;
    picks[j] = pool.index[k];
  }
  for (int64_t t = 0; t < block; ++t) available[picks[t]] = 0;
  return block;
}

}  // namespace

extern "C" {
int64_t dgmr_pick_block_f32(const float* residual, int64_t ld, int64_t m, int64_t n, const double* sq_norm,
                            uint8_t* available, int64_t block, double tol2, int64_t limit, int64_t* picks,
                            float* basis, int64_t* exhausted) {
  return pick_block<float>(residual, ld, m, n, sq_norm, available, block, tol2, limit, picks, basis, exhausted);
}
int64_t dgmr_pick_block_f64(const double* residual, int64_t ld, int64_t m, int64_t n, const double* sq_norm,
                            uint8_t* available, int64_t block, double tol2, int64_t limit, int64_t* picks,
                            double* basis, int64_t* exhausted) {
  return pick_block<double>(residual, ld, m, n, sq_norm, available, block, tol2, limit, picks, basis, exhausted);
}
}
